"""2-, 3- and 4-bit codes to fp16 levels in registers by PTX (GPU only: inline assembly).

``tl.gather`` of the 16 Lloyd–Max levels costs more than the rest of a 4-bit decode
(docs/experiments.md). Here a ``prmt`` reads four bytes of an 8-byte table in one
instruction, with a selector of four 3-bit nibbles, which the codes nearly are. Evenly spaced
levels need no table: the code moved into an fp16 mantissa is the level up to an affine map
(:func:`uniform_levels_asm`). 3-bit codes come in two planes (2-bit and 1-bit) that are joined
in registers before an 8-entry lookup (:func:`prmt_planes_asm`).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["even_odd_levels", "plane_levels", "prmt_enabled", "prmt_lookup_asm",
           "prmt_planes_asm", "quarter_levels", "uniform_levels_asm"]


def prmt_enabled(device: torch.device) -> bool:
    """Inline PTX runs on CUDA devices, never under the interpreter."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _word(b) -> str:  # four bytes, the first lowest
    return f"0x{b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24:08X}"


# selectors from the codes y (one code per byte, < 8): bytes reordered (c0, c2, c1, c3), then
# nibbles 0–3 of s = c0 … c3 (prmt reads only bits 0–15 of its selector)
_SELECT = "prmt.b32 z, y, zr, 0x3120;\nshr.b32 s, z, 12;\nor.b32 s, z, s;\n"
# fp16 pairs from four low bytes a0 and four high bytes b0
_PAIRS = "prmt.b32 {0}, a0, b0, 0x5140;\nprmt.b32 {1}, a0, b0, 0x7362;\n"


@functools.lru_cache(maxsize=16)
def _asm4(bits: tuple[int, ...]) -> str:
    lo = [b & 0xFF for b in bits]
    hi = [b >> 8 for b in bits]
    tables = "".join(f"mov.b32 l{i}, {_word(lo[4 * i:4 * i + 4])};\n"
                     f"mov.b32 h{i}, {_word(hi[4 * i:4 * i + 4])};\n" for i in range(4))

    def half(out0: str, out1: str) -> str:
        return (_SELECT + "and.b32 s, s, 0x7777;\n"  # bit 3 off: it would sign-replicate
                # byte k = 0xFF where c_k ≥ 8: bit 3 moved to the byte's sign, replicated
                "shl.b32 m, y, 4;\n"
                "prmt.b32 m, m, zr, 0xBA98;\n"
                "prmt.b32 a0, l0, l1, s;\n"  # low bytes of codes 0–7 …
                "prmt.b32 a1, l2, l3, s;\n"  # … and 8–15
                "prmt.b32 b0, h0, h1, s;\n"
                "prmt.b32 b1, h2, h3, s;\n"
                "lop3.b32 a0, a0, a1, m, 0xD8;\n"  # (a1 & m) | (a0 & ~m)
                "lop3.b32 b0, b0, b1, m, 0xD8;\n"
                + _PAIRS.format(out0, out1))

    return ("{\n.reg .b32 l0, l1, l2, l3, h0, h1, h2, h3, zr, y, z, s, m, a0, a1, b0, b1;\n"
            + tables + "mov.b32 zr, 0;\n"
            + "and.b32 y, $4, 0x0F0F0F0F;\n" + half("$0", "$1")
            + "shr.b32 y, $4, 4;\nand.b32 y, y, 0x0F0F0F0F;\n" + half("$2", "$3")
            + "}")


@functools.lru_cache(maxsize=16)
def _asm2(bits: tuple[int, ...]) -> str:
    tables = (f"mov.b32 l0, {_word([b & 0xFF for b in bits])};\n"
              f"mov.b32 h0, {_word([b >> 8 for b in bits])};\n")
    fields = "".join(
        f"shr.b32 y, $8, {2 * f};\nand.b32 y, y, 0x03030303;\n" + _SELECT
        + "prmt.b32 a0, l0, zr, s;\nprmt.b32 b0, h0, zr, s;\n"
        + _PAIRS.format(f"${2 * f}", f"${2 * f + 1}") for f in range(4))
    return ("{\n.reg .b32 l0, h0, zr, y, z, s, a0, b0;\n" + tables + "mov.b32 zr, 0;\n"
            + fields + "}")


def prmt_lookup_asm(levels: torch.Tensor) -> str:
    """PTX for ``tl.inline_asm_elementwise(pack=4)``: one register of four code bytes → the
    fp16 levels of their codes, field by field, two registers (four elements) per field.

    - 16 levels (4-bit codes, 2 per byte): input ``$4``; low nibbles → ``$0, $1``, high
      nibbles → ``$2, $3``. The levels' low bytes sit in four registers (codes 0–7 in
      ``l0:l1``, 8–15 in ``l2:l3``), their high bytes in four more. Four codes' low bytes
      come from two lookups (codes below 8 and from 8), merged by a byte mask of bit 3 (a
      sign-replicating ``prmt`` of the codes shifted up by 4); likewise the high bytes.
    - 4 levels (2-bit codes, 4 per byte): input ``$8``; field f (bits 2f, 2f + 1 of every
      byte) → ``$2f, $2f+1``; one lookup each for the low and the high bytes.

    Two more ``prmt`` interleave low and high bytes into fp16 pairs.
    """
    asm = {4: _asm2, 16: _asm4}.get(levels.numel())
    if asm is None:
        raise ValueError(f"need the 4 or 16 levels of a 2- or 4-bit code, got {levels.numel()}")
    bits = levels.detach().cpu().to(torch.float16).view(torch.int16).long() & 0xFFFF
    return asm(tuple(bits.tolist()))


def _magic(t: str, shift: int, mask: int, out: str) -> str:
    """fp16 pairs ``2c − centre`` of the two codes at bits ``shift`` … of ``t``'s two
    half-words: each code moved to mantissa bits 1 … under the exponent of 1024 (fp16 bits
    ``0x6400 | 2c`` are ``1024 + 2c``), then ``k`` (``1024 + centre``, twice) subtracted,
    exactly."""
    move = f"shl.b32 u, {t}, 1;\n" if shift == 0 else f"shr.b32 u, {t}, {shift - 1};\n"
    return (move + f"and.b32 u, u, 0x{mask:08X};\nor.b32 u, u, 0x64006400;\n"
            f"sub.f16x2 {out}, u, k;\n")


@functools.lru_cache(maxsize=16)
def _asm3(bits: tuple[int, ...]) -> str:
    tables = (f"mov.b32 l0, {_word([b & 0xFF for b in bits[:4]])};\n"
              f"mov.b32 l1, {_word([b & 0xFF for b in bits[4:]])};\n"
              f"mov.b32 h0, {_word([b >> 8 for b in bits[:4]])};\n"
              f"mov.b32 h1, {_word([b >> 8 for b in bits[4:]])};\n")
    fields = "".join(
        f"shr.b32 y, $8, {2 * f};\nand.b32 y, y, 0x03030303;\n"
        f"shr.b32 t, $9, {f};\nand.b32 t, t, 0x01010101;\nshl.b32 t, t, 2;\nor.b32 y, y, t;\n"
        + _SELECT + "prmt.b32 a0, l0, l1, s;\nprmt.b32 b0, h0, h1, s;\n"
        + _PAIRS.format(f"${2 * f}", f"${2 * f + 1}") for f in range(4))
    return ("{\n.reg .b32 l0, l1, h0, h1, zr, y, t, z, s, a0, b0;\n" + tables
            + "mov.b32 zr, 0;\n" + fields + "}")


def prmt_planes_asm(levels: torch.Tensor) -> str:
    """PTX for ``tl.inline_asm_elementwise(pack=4)`` on two byte tensors: 3-bit codes stored as
    a 2-bit plane (``$8``: field f of byte i, bits 2f, 2f + 1, is the low two bits of code
    4i + f) and a 1-bit plane (``$9``: bit f of byte i is its high bit) → the fp16 levels of
    the 8-level codebook, field f → ``$2f, $2f+1`` as :func:`prmt_lookup_asm` at 2 bits."""
    if levels.numel() != 8:
        raise ValueError(f"need the 8 levels of a 3-bit code, got {levels.numel()}")
    bits = levels.detach().cpu().to(torch.float16).view(torch.int16).long() & 0xFFFF
    return _asm3(tuple(bits.tolist()))


@triton.jit
def plane_levels(p_rows, o_f, m_n, QUARTER: tl.constexpr, ASM: tl.constexpr):
    """``lev[c]`` of 3-bit codes in two planes (the 2-bit plane at bytes ``o_f [D/4]``, the
    1-bit plane after it, ``QUARTER`` = D/4 bytes in: byte ``QUARTER + i // 2`` holds the high
    bits of bytes i in its nibble ``i % 2``): four fp16 tiles ``[N, D/4]`` as
    :func:`quarter_levels`."""
    b_a = tl.load(p_rows + o_f[None, :], mask=m_n[:, None], other=0)
    b_h = tl.load(p_rows + QUARTER + (o_f // 2)[None, :], mask=m_n[:, None], other=0)
    b_h = b_h >> ((o_f % 2) * 4).to(tl.uint8)[None, :]
    return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [b_a, b_h],
                                     dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                     is_pure=True, pack=4)


@functools.lru_cache(maxsize=4)
def uniform_levels_asm(bits: int) -> str:
    """PTX with the register contract of :func:`prmt_lookup_asm` for evenly spaced levels:
    ``2c − (2^bits − 1)`` = ``2 (c − (2^bits − 1)/2)``, exact in fp16, so the level is that
    times half the codec's step. Bytes 0, 1 and bytes 2, 3 of the input are first spread to
    the two half-words of a register (``prmt``); per pair of codes then one shift, one
    ``lop3`` (and, or) and one ``sub.f16x2``, against about eight ``prmt`` per four codes for
    a 16-level lookup."""
    if bits not in (2, 4):
        raise ValueError(f"bits must be 2 or 4, got {bits}")
    word = "$4" if bits == 4 else "$8"
    centre = 0x6400 + 2**bits - 1  # the fp16 1024 + 2^bits − 1
    body = (f"prmt.b32 y0, {word}, zr, 0x4140;\nprmt.b32 y1, {word}, zr, 0x4342;\n"
            f"mov.b32 k, 0x{centre:04X}{centre:04X};\n")
    if bits == 4:  # low nibbles → $0 (bytes 0, 1), $1 (bytes 2, 3); high nibbles → $2, $3
        for half, shift in ((0, 0), (2, 4)):
            for j in range(2):
                body += _magic(f"y{j}", shift, 0x001E001E, f"${half + j}")
    else:  # field f (bits 2f, 2f + 1) → $2f (bytes 0, 1), $2f+1 (bytes 2, 3)
        for f in range(4):
            for j in range(2):
                body += _magic(f"y{j}", 2 * f, 0x00060006, f"${2 * f + j}")
    return "{\n.reg .b32 zr, y0, y1, u, k;\nmov.b32 zr, 0;\n" + body + "}"


@triton.jit
def even_odd_levels(p_rows, o_h, m_n, ASM: tl.constexpr):
    """``lev[c]`` of the low nibbles (even coordinates) and high nibbles (odd coordinates) of
    the bytes ``p_rows [N, 1] + o_h [D/2]`` (rows where ``m_n`` is false read as code 0): two
    fp16 tiles ``[N, D/2]``."""
    b_b = tl.load(p_rows + o_h[None, :], mask=m_n[:, None], other=0)
    return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [b_b],
                                     dtype=(tl.float16, tl.float16), is_pure=True, pack=4)


@triton.jit
def quarter_levels(p_rows, o_f, m_n, ASM: tl.constexpr):
    """``lev[c]`` of the 2-bit codes in bits 2f, 2f + 1 of the bytes ``p_rows [N, 1] + o_f
    [D/4]`` (coordinates 4i + f), f = 0 … 3: four fp16 tiles ``[N, D/4]``."""
    b_b = tl.load(p_rows + o_f[None, :], mask=m_n[:, None], other=0)
    return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b_b],
                                     dtype=(tl.float16, tl.float16, tl.float16, tl.float16),
                                     is_pure=True, pack=4)
