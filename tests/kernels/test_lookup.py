"""The 2- and 4-bit register lookups of ``sphkv.kernels.ada_decode.lookup``: their PTX
executed on the CPU by a small emulator of the instructions it uses (the interpreter runs no
assembly; on a GPU the decode tests run it for real)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sphkv.codec import TurboQuantCodec
from sphkv.kernels.ada_decode.lookup import (
    prmt_lookup_asm,
    prmt_planes_asm,
    uniform_levels_asm,
)


def test_prmt_tables_hold_the_levels():
    """The asm's byte tables are the fp16 levels: low and high bytes of code c at byte c."""
    lev = torch.linspace(-2.7, 2.7, 16)
    asm = prmt_lookup_asm(lev)
    bits = lev.half().view(torch.int16).long() & 0xFFFF
    for i in range(4):
        for name, table in (("l", bits & 0xFF), ("h", bits >> 8)):
            word = sum(int(table[4 * i + j]) << 8 * j for j in range(4))
            assert f"mov.b32 {name}{i}, 0x{word:08X};" in asm


def _run_ptx(asm: str, regs: dict[str, int]) -> dict[str, int]:
    """Execute the straight-line PTX of the lookups of ``lookup.py``
    (mov, and, or, shl, shr, prmt in its default mode, lop3, sub.f16x2) on 32-bit integers: the
    CPU check of the lookups' logic."""
    def val(x):
        return regs[x] if x in regs else int(x, 0)

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        d, *src = [a.strip() for a in args.split(",")]
        a = [val(x) for x in src]
        if op == "mov.b32":
            r = a[0]
        elif op == "and.b32":
            r = a[0] & a[1]
        elif op == "or.b32":
            r = a[0] | a[1]
        elif op == "shl.b32":
            r = a[0] << a[1]
        elif op == "shr.b32":
            r = a[0] >> a[1]
        elif op == "prmt.b32":  # byte k of d: byte (nibble k & 7) of {b, a}; nibble bit 3 →
            pool = a[0] | a[1] << 32  # that byte's sign replicated
            r = 0
            for k in range(4):
                sel = a[2] >> 4 * k & 0xF
                byte = pool >> 8 * (sel & 7) & 0xFF
                r |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << 8 * k
        elif op == "sub.f16x2":  # two fp16 in the half-words, rounded to nearest
            x, y = (np.array([v & 0xFFFF, v >> 16], dtype=np.uint16).view(np.float16)
                    for v in a)
            r = int(np.array(x - y, dtype=np.float16).view(np.uint16).astype(np.int64)
                    @ np.array([1, 1 << 16]))
        elif op == "lop3.b32":  # bit i of d: bit (a_i b_i c_i) of the lookup table
            r = 0
            for i in range(32):
                idx = (a[0] >> i & 1) << 2 | (a[1] >> i & 1) << 1 | (a[2] >> i & 1)
                r |= (a[3] >> idx & 1) << i
        else:
            raise AssertionError(f"unexpected instruction {op}")
        regs[d] = r & 0xFFFFFFFF
    return regs


def test_prmt_lookup_decodes_every_byte():
    """For all 256 code bytes in each lane: the low nibbles' levels in $0/$1, the high ones'
    in $2/$3, element 0 in the low half."""
    lev = torch.as_tensor(TurboQuantCodec(d=64, bits=4).quantizer.levels, dtype=torch.float32)
    want = lev.half().view(torch.int16).long() & 0xFFFF
    asm = prmt_lookup_asm(lev)
    for start in range(0, 256, 4):
        b = [start, (start + 77) % 256, (start + 151) % 256, (start + 230) % 256]
        out = _run_ptx(asm, {"$4": b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24})
        for k in range(4):
            reg_lo, reg_hi, shift = f"${k // 2}", f"${2 + k // 2}", 16 * (k % 2)
            assert out[reg_lo] >> shift & 0xFFFF == want[b[k] & 15]
            assert out[reg_hi] >> shift & 0xFFFF == want[b[k] >> 4]


def test_prmt_lookup_decodes_every_2bit_byte():
    """2-bit codes: field f (bits 2f, 2f + 1 of each byte) in $2f/$2f+1, element 0 low."""
    lev = torch.as_tensor(TurboQuantCodec(d=64, bits=2).quantizer.levels, dtype=torch.float32)
    want = lev.half().view(torch.int16).long() & 0xFFFF
    asm = prmt_lookup_asm(lev)
    for start in range(0, 256, 4):
        b = [start, (start + 77) % 256, (start + 151) % 256, (start + 230) % 256]
        out = _run_ptx(asm, {"$8": b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24})
        for f in range(4):
            for k in range(4):
                reg, shift = f"${2 * f + k // 2}", 16 * (k % 2)
                assert out[reg] >> shift & 0xFFFF == want[b[k] >> 2 * f & 3], (start, f, k)


def test_refuses_other_level_counts():
    with pytest.raises(ValueError, match="4 or 16 levels"):
        prmt_lookup_asm(torch.zeros(8))


@pytest.mark.parametrize("bits", [2, 4])
def test_uniform_levels_decode_every_byte(bits):
    """Evenly spaced levels without a table: each code c comes out as the fp16 2c − (2^bits − 1),
    in the registers and halves where :func:`prmt_lookup_asm` puts its level."""
    asm = uniform_levels_asm(bits)
    fields, top = 8 // bits, 2**bits - 1
    for start in range(0, 256, 4):
        b = [start, (start + 77) % 256, (start + 151) % 256, (start + 230) % 256]
        word = b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24
        out = _run_ptx(asm, {"$4" if bits == 4 else "$8": word})
        for f in range(fields):
            for k in range(4):
                half = out[f"${2 * f + k // 2}"] >> 16 * (k % 2) & 0xFFFF
                code = b[k] >> bits * f & top
                assert np.array([half], dtype=np.uint16).view(np.float16)[0] == 2 * code - top


def test_uniform_levels_refuse_other_depths():
    with pytest.raises(ValueError, match="2 or 4"):
        uniform_levels_asm(3)


def test_plane_lookup_decodes_every_code():
    """3-bit codes from a 2-bit plane byte ($8) and the high bits in the low nibble of a second
    byte ($9, whose high nibble is ignored): field f of byte k → register $2f (bytes 0, 1) or
    $2f+1 (bytes 2, 3), byte k's level in half k % 2."""
    lev = torch.as_tensor(TurboQuantCodec(d=128, bits=3).quantizer.levels, dtype=torch.float32)
    want = lev.half().view(torch.int16).long() & 0xFFFF
    asm = prmt_planes_asm(lev)
    gen = torch.Generator().manual_seed(0)
    for _ in range(64):
        a, h = torch.randint(0, 256, (2, 4), generator=gen).tolist()
        out = _run_ptx(asm, {"$8": sum(x << 8 * k for k, x in enumerate(a)),
                             "$9": sum(x << 8 * k for k, x in enumerate(h))})
        for f in range(4):
            for k in range(4):
                code = (a[k] >> 2 * f & 3) | (h[k] >> f & 1) << 2
                assert out[f"${2 * f + k // 2}"] >> 16 * (k % 2) & 0xFFFF == want[code]


def test_plane_lookup_needs_eight_levels():
    with pytest.raises(ValueError, match="8 levels"):
        prmt_planes_asm(torch.zeros(16))
