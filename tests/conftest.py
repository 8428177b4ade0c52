"""Settings every test needs before any module is imported.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported, and other tests import it
indirectly (through torch and transformers) before the kernel tests run; so it is set here, at
the root, for machines without a GPU, where kernels run on the CPU through the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
