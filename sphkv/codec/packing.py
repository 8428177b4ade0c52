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
    if _byte_aligned([(c.shape[-1], b) for c, b in zip(fields, bits, strict=True)]):
        parts = [_pack_whole_bytes(c, b) for c, b in zip(fields, bits, strict=True) if b]
        if parts:
            return torch.cat(parts, -1)
    return _pack_bits(fields, bits)


def unpack(payload: torch.Tensor, layout: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Inverse of :func:`pack`: ``payload`` uint8 ``[..., nbytes]`` -> int64 ``[..., m_k]`` each."""
    if not _byte_aligned(layout):
        return _unpack_bits(payload, layout)
    out, start = [], 0
    for m, b in layout:
        if b == 0:
            out.append(_no_codes(payload, m))
            continue
        # code r of a byte sits at bits r b … r b + b − 1
        field = payload[..., start:start + m * b // 8]
        out.append(torch.stack([(field >> r * b) & (2**b - 1) for r in range(8 // b)],
                               -1).flatten(-2).long())
        start += m * b // 8
    return out


def _no_codes(payload: torch.Tensor, m: int) -> torch.Tensor:
    """The ``m`` codes of a 0-bit field: zeros, int64 ``[..., m]``."""
    return torch.zeros(*payload.shape[:-1], m, dtype=torch.int64, device=payload.device)


def _byte_aligned(layout: list[tuple[int, int]]) -> bool:
    """Whether every field is whole bytes of codes that divide a byte (1, 2, 4 or 8 bits): then
    each byte holds 8 / b codes of one field, and packing is shifts within bytes."""
    return all(b in (0, 1, 2, 4, 8) and m * b % 8 == 0 for m, b in layout)


def _pack_whole_bytes(codes: torch.Tensor, b: int) -> torch.Tensor:
    """One byte-aligned field (:func:`_byte_aligned`): code r of each group of 8 / b at bits
    r b and up of its byte — what the bit stream gives."""
    c = codes.to(torch.uint8).unflatten(-1, (-1, 8 // b))
    out = c[..., 0].clone()
    for r in range(1, 8 // b):
        out |= c[..., r] << r * b
    return out


def _pack_bits(fields: list[torch.Tensor], bits: list[int]) -> torch.Tensor:
    """:func:`pack` of any layout, through the stream of bits."""
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


def _unpack_bits(payload: torch.Tensor, layout: list[tuple[int, int]]) -> list[torch.Tensor]:
    """:func:`unpack` of any layout, through the stream of bits."""
    # bit j of byte i is bit 8 i + j of the stream
    stream = torch.stack([(payload >> j) & 1 for j in range(8)], -1).flatten(-2)
    out, start = [], 0
    for m, b in layout:
        if b == 0:
            out.append(_no_codes(payload, m))
            continue
        plane = stream[..., start:start + m * b].unflatten(-1, (m, b)).to(torch.int32)
        code = plane[..., 0].clone()
        for j in range(1, b):
            code |= plane[..., j] << j
        out.append(code.long())
        start += m * b
    return out
