"""4-bit level lookup in registers by PTX byte permutes (GPU only: inline assembly).

``tl.gather`` of the 16 Lloyd–Max levels costs more than the rest of a 4-bit decode
(docs/kernel_notes.md, session 4). Here a ``prmt`` reads four bytes of an 8-byte table in one
instruction, with a selector of four 3-bit nibbles, which the codes nearly are.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["prmt_enabled", "prmt_lookup_asm"]


def prmt_enabled(device: torch.device) -> bool:
    """Inline PTX runs on CUDA devices, never under the interpreter."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"


@functools.lru_cache(maxsize=16)
def _asm(bits: tuple[int, ...]) -> str:
    lo = [b & 0xFF for b in bits]
    hi = [b >> 8 for b in bits]

    def word(b):  # four bytes, the first lowest
        return f"0x{b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24:08X}"

    tables = "".join(f"mov.b32 l{i}, {word(lo[4 * i:4 * i + 4])};\n"
                     f"mov.b32 h{i}, {word(hi[4 * i:4 * i + 4])};\n" for i in range(4))

    def half(out0: str, out1: str) -> str:
        return (
            # selectors: bytes reordered (c0, c2, c1, c3), then nibbles 0–3 = c0 … c3, bit 3 off
            "prmt.b32 z, y, zr, 0x3120;\n"
            "shr.b32 s, z, 12;\n"
            "lop3.b32 s, z, s, k7, 0xA8;\n"  # (z | s) & 0x7777
            # byte k = 0xFF where c_k ≥ 8: bit 3 moved to the byte's sign, replicated
            "shl.b32 m, y, 4;\n"
            "prmt.b32 m, m, zr, 0xBA98;\n"
            "prmt.b32 a0, l0, l1, s;\n"  # low bytes of codes 0–7 …
            "prmt.b32 a1, l2, l3, s;\n"  # … and 8–15
            "prmt.b32 b0, h0, h1, s;\n"
            "prmt.b32 b1, h2, h3, s;\n"
            "lop3.b32 a0, a0, a1, m, 0xD8;\n"  # (a1 & m) | (a0 & ~m)
            "lop3.b32 b0, b0, b1, m, 0xD8;\n"
            f"prmt.b32 {out0}, a0, b0, 0x5140;\n"  # fp16 pairs: low byte, high byte
            f"prmt.b32 {out1}, a0, b0, 0x7362;\n")

    return ("{\n.reg .b32 l0, l1, l2, l3, h0, h1, h2, h3, zr, k7, y, z, s, m, a0, a1, b0, b1;\n"
            + tables + "mov.b32 zr, 0;\nmov.b32 k7, 0x7777;\n"
            + "and.b32 y, $4, 0x0F0F0F0F;\n" + half("$0", "$1")
            + "shr.b32 y, $4, 4;\nand.b32 y, y, 0x0F0F0F0F;\n" + half("$2", "$3")
            + "}")


def prmt_lookup_asm(levels: torch.Tensor) -> str:
    """PTX for ``tl.inline_asm_elementwise(pack=4)``: one register of four code bytes (``$4``)
    → the fp16 levels of their low nibbles (``$0, $1``) and high nibbles (``$2, $3``).

    The 16 levels' low bytes are held in four registers (``l0 … l3``: codes 0–7 in l0:l1, 8–15
    in l2:l3) and their high bytes in four (``h0 … h3``). Four codes' low bytes come from two
    lookups (codes below 8 and from 8), merged by a byte mask of bit 3 (a sign-replicating
    ``prmt`` of the codes shifted up by 4); likewise the high bytes; two more ``prmt``
    interleave low and high bytes into fp16 pairs.
    """
    if levels.numel() != 16:
        raise ValueError(f"need the 16 levels of a 4-bit code, got {levels.numel()}")
    bits = levels.detach().cpu().to(torch.float16).view(torch.int16).long() & 0xFFFF
    return _asm(tuple(bits.tolist()))


@triton.jit
def even_odd_levels(p_rows, o_h, m_n, ASM: tl.constexpr):
    """``lev[c]`` of the low nibbles (even coordinates) and high nibbles (odd coordinates) of
    the bytes ``p_rows [N, 1] + o_h [D/2]`` (rows where ``m_n`` is false read as code 0): two
    fp16 tiles ``[N, D/2]``."""
    b_b = tl.load(p_rows + o_h[None, :], mask=m_n[:, None], other=0)
    return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [b_b],
                                     dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
