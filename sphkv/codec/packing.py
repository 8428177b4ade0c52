"""Bit packing of integer codes into uint8 bytes, little-endian within each byte.

The codes of one vector are laid out field after field (a field: ``m`` codes of ``b`` bits each),
and each vector is padded to a whole number of bytes.
"""

from __future__ import annotations

import math

import torch

__all__ = ["packed_bytes", "pack", "unpack"]


def packed_bytes(layout: list[tuple[int, int]]) -> int:
    """Bytes per vector for a layout ``[(m, bits), ...]``."""
    return math.ceil(sum(m * b for m, b in layout) / 8)


def pack(fields: list[torch.Tensor], bits: list[int]) -> torch.Tensor:
    """Pack integer codes into bytes.

    Parameters
    ----------
    fields : list of torch.Tensor
        Integer tensors ``[..., m_k]`` with values in ``[0, 2**bits[k])``, equal batch shape.
    bits : list of int
        Bits per code of each field, 0 to 16 (a 0-bit field stores nothing).

    Returns
    -------
    torch.Tensor
        uint8 ``[..., packed_bytes(layout)]``.
    """
    planes = []
    for codes, b in zip(fields, bits, strict=True):
        if b == 0:
            continue
        c = codes.to(torch.int32)
        # bit j of every code, [..., m, b] -> [..., m * b]
        planes.append(torch.stack([((c >> j) & 1).to(torch.uint8) for j in range(b)],
                                  -1).flatten(-2))
    batch = fields[0].shape[:-1]
    device = fields[0].device
    stream = torch.cat(planes, -1) if planes else torch.zeros(*batch, 0, dtype=torch.uint8,
                                                              device=device)
    pad = -stream.shape[-1] % 8
    stream = torch.nn.functional.pad(stream, (0, pad)).unflatten(-1, (-1, 8))
    out = stream[..., 0].clone()
    for j in range(1, 8):
        out |= stream[..., j] << j
    return out


def unpack(payload: torch.Tensor, layout: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Inverse of :func:`pack`: ``payload`` uint8 ``[..., nbytes]`` -> int64 ``[..., m_k]`` each."""
    # bit j of byte i is bit 8 i + j of the stream
    stream = torch.stack([(payload >> j) & 1 for j in range(8)], -1).flatten(-2)
    out, start = [], 0
    for m, b in layout:
        if b == 0:
            out.append(torch.zeros(*payload.shape[:-1], m, dtype=torch.int64,
                                   device=payload.device))
            continue
        plane = stream[..., start:start + m * b].unflatten(-1, (m, b)).to(torch.int32)
        code = plane[..., 0].clone()
        for j in range(1, b):
            code |= plane[..., j] << j
        out.append(code.long())
        start += m * b
    return out
