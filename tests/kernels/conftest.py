"""Kernel tests run their Triton kernels on the CPU through the interpreter when no GPU is there.

``TRITON_INTERPRET`` must be set before the first ``@triton.jit`` runs, so it is set here, before
any kernel module is imported by the tests.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
