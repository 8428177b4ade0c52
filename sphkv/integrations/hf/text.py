"""Token ids from a text file, plain or gzip-compressed."""

from __future__ import annotations

import gzip
from pathlib import Path

import torch

__all__ = ["read_tokens"]


def read_tokens(tokenizer, path: str | Path, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` token ids ``[n_tokens]`` of the text in ``path`` (``.gz`` allowed).

    Reads a prefix of the file, growing it until it holds enough tokens, so long books are not
    tokenized whole.
    """
    path = Path(path)
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    opener = gzip.open if path.suffix == ".gz" else open
    chars = 8 * n_tokens  # English averages about 4 characters per token
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read(chars)
        while True:
            ids = tokenizer(text, return_tensors="pt").input_ids[0]
            if ids.numel() > n_tokens:
                return ids[:n_tokens]
            more = f.read(len(text))
            if not more:
                break
            text += more
    if ids.numel() < n_tokens:
        raise ValueError(f"{path} holds only {ids.numel():,} tokens; --tokens {n_tokens:,} asked")
    return ids
