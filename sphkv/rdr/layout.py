"""Attention layouts: which past tokens a layer's queries can see.

A layer attends in one of three patterns (the names of transformers' ``config.layer_types``):

- ``full``: a query at position t sees every position ≤ t;
- ``sliding`` with window S: positions ``t − S < p ≤ t``;
- ``chunked`` with chunk C: positions of t's chunk, ``pad + ⌊(t − pad)/C⌋·C ≤ p ≤ t``, chunks
  counted from the sequence's first real token ``pad`` (its left padding).

Positions count padding, as the cache's slots do. The lowest visible position never decreases
as t grows, so a token below it for the next query is invisible to every later one: a sliding
or chunked layer keeps only what it can still attend to, and the model's own cache holds at most
``min(length, size)`` of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LAYER_KINDS", "LayerAttention"]

#: the attention patterns sphkv handles
LAYER_KINDS = ("full", "sliding", "chunked")


@dataclass(frozen=True)
class LayerAttention:
    """The attention pattern of one layer.

    Parameters
    ----------
    kind : str
        ``"full"``, ``"sliding"`` or ``"chunked"``.
    size : int, optional
        The sliding window S or the chunk C (tokens); None for ``full``.
    """

    kind: str = "full"
    size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"kind must be one of {', '.join(LAYER_KINDS)}, got {self.kind!r}")
        if self.kind == "full":
            if self.size is not None:
                raise ValueError(f"a full-attention layer takes no size, got {self.size!r}")
        elif isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"a {self.kind} layer needs size >= 1 (its window or chunk in "
                             f"tokens), got {self.size!r}")

    def __str__(self) -> str:
        return self.kind if self.size is None else f"{self.kind}:{self.size}"

    @classmethod
    def parse(cls, text: str) -> LayerAttention:
        """The layout :func:`str` wrote: ``full``, ``sliding:512``, ``chunked:8192``."""
        kind, _, size = text.partition(":")
        try:
            return cls(kind, int(size) if size else None)
        except ValueError as exc:
            raise ValueError(f"not a layer layout: {text!r} ({exc})") from None

    @property
    def is_full(self) -> bool:
        return self.kind == "full"

    def first_visible(self, position: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Lowest position a query at ``position`` sees, padding excluded.

        Parameters
        ----------
        position : torch.Tensor
            int, any shape: the query positions.
        pad : torch.Tensor
            int, broadcastable to ``position``: each sequence's left padding.
        """
        position, pad = torch.as_tensor(position), torch.as_tensor(pad)
        if self.kind == "sliding":
            return torch.maximum(position - self.size + 1, pad)
        if self.kind == "chunked":
            return torch.maximum(pad + torch.div(position - pad, self.size,
                                                 rounding_mode="floor") * self.size, pad)
        return torch.broadcast_to(pad, torch.broadcast_shapes(position.shape, pad.shape))

    def held_tokens(self, length: int) -> int:
        """Tokens the model's own cache holds for this layer after ``length`` tokens."""
        return length if self.size is None else min(length, self.size)
