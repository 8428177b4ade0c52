"""The Triton encode + pack against its torch reference (the codec's ``encode`` written into the
slots): TurboQuant at every bit depth 1–8, int8, fp16; odd counts, scattered slots, rows not
named left alone. TurboQuant codes may differ only by one level, where the rotated coordinate
sits on the threshold between the two to within float32 rounding; those are counted."""

from __future__ import annotations

import math

import pytest
import torch

from sphkv.codec import Codes, Fp16Codec, Int8Codec, TurboQuantCodec
from sphkv.codec.packing import unpack
from sphkv.kernels.encode_pack import encode_codes, encode_pack, encode_pack_naive
from tests.kernels.common import DEVICE

# |z − threshold| below which the kernel and the reference may pick different sides
# (float32 rounding of a D-term dot, the norm and the division: a few 1e-6 for |z| ≲ 4)
TIE = 1e-4
# fraction of coordinates allowed to sit that close (Gaussian data: ~1e-4 expected at most)
MAX_TIES = 2e-3


def make(codec, n, rows, gen, dtype):
    """Fresh data (a per-channel offset, some large vectors, a zero vector), a pool of random
    bytes, and n distinct scattered slots."""
    x = torch.randn(n, codec.d, generator=gen) * torch.rand(n, 1, generator=gen) * 4 + \
        torch.randn(codec.d, generator=gen)
    x[n // 2] = 0.0
    x = x.to(dtype).to(DEVICE)
    template = codec.encode(torch.zeros(1, codec.d))
    payload = torch.randint(0, 256, (rows, template.payload.shape[1]), generator=gen,
                            dtype=torch.uint8)
    side = {k: torch.randn(rows, generator=gen).half() for k in template.side}
    slots = torch.randperm(rows, generator=gen)[:n]

    def pool():
        return Codes(payload.clone().to(DEVICE), {k: v.clone().to(DEVICE)
                                                  for k, v in side.items()},
                     torch.Size((rows, codec.d)))

    return x, pool(), pool(), slots.to(DEVICE)


def check_turbo(codec, x, ref, out, slots):
    d, bits = codec.d, codec.bits
    ref_c = unpack(ref.payload[slots].cpu(), [(d, bits)])[0]
    out_c = unpack(out.payload[slots].cpu(), [(d, bits)])[0]
    diff = ref_c != out_c
    # z in float64: where the two disagree it sits on the threshold between their levels
    y = x.double().cpu() @ codec.rotation.matrix("cpu").double()
    z = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-300) * math.sqrt(d)
    thr = torch.as_tensor(codec.quantizer.thresholds, dtype=torch.float64)
    assert ((ref_c - out_c).abs() <= 1).all()
    gap = (z[diff] - thr[torch.minimum(ref_c, out_c)[diff]]).abs()
    print(f"turbo{bits} D{d}: {int(diff.sum())} of {diff.numel()} codes differ, "
          f"|z − threshold| ≤ {gap.max().item() if gap.numel() else 0:.2g} there")
    assert (gap < TIE).all()
    assert diff.sum() <= 2 + MAX_TIES * diff.numel()
    # fp16 norms: equal, or one ulp apart where the float32 norm sits on an fp16 tie; an
    # unbiased norm reads every level, so a vector whose codes differ is left out
    same = ~diff.any(-1) if codec.unbiased else torch.ones(len(slots), dtype=torch.bool)
    a, b = (pool.side["norm"][slots].float().cpu()[same] for pool in (ref, out))
    assert ((a - b).abs() <= a.abs() * 2.0**-10).all()
    assert (a != b).sum() <= 2 + MAX_TIES * len(a)


CASES = [
    *[(f"turbo{b}-D64-N37", TurboQuantCodec(d=64, bits=b), 37) for b in range(1, 9)],
    ("turbo3-D16-N100", TurboQuantCodec(d=16, bits=3), 100),
    ("turbo2-D128-N333-seed5", TurboQuantCodec(d=128, bits=2, seed=5), 333),
    ("turbo4-D128-N200", TurboQuantCodec(d=128, bits=4), 200),
    ("uniform4-D128-N150", TurboQuantCodec(d=128, bits=4, levels="uniform"), 150),
    ("uniform2-D64-N70", TurboQuantCodec(d=64, bits=2, levels="uniform"), 70),
    ("turbo3-D128-N129", TurboQuantCodec(d=128, bits=3), 129),
    *[(f"unbiased{b}-D64-N37", TurboQuantCodec(d=64, bits=b, unbiased=True), 37)
      for b in (1, 2, 3, 4)],
    ("unbiased2-D128-N333", TurboQuantCodec(d=128, bits=2, unbiased=True), 333),
    ("int8-D64-N77", Int8Codec(d=64), 77),
    ("int8-D128-N40", Int8Codec(d=128), 40),
    ("fp16-D128-N45", Fp16Codec(d=128), 45),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,codec,n", CASES, ids=[c[0] for c in CASES])
def test_encode_pack_matches_reference(name, codec, n, dtype):
    gen = torch.Generator().manual_seed(n + codec.d)
    x, ref, out, slots = make(codec, n, 3 * n + 5, gen, dtype)
    encode_pack_naive(x, codec, ref, slots)
    encode_pack(x, codec, out, slots, block_m=16 if n < 64 else 32)
    # rows not named are untouched
    rest = torch.ones(ref.payload.shape[0], dtype=torch.bool, device=DEVICE)
    rest[slots] = False
    assert torch.equal(ref.payload[rest], out.payload[rest])
    for k in ref.side:
        assert torch.equal(ref.side[k][rest], out.side[k][rest])
    if isinstance(codec, TurboQuantCodec):
        check_turbo(codec, x, ref, out, slots)
    else:  # int8 and fp16: bit-exact
        assert torch.equal(ref.payload, out.payload)
        for k in ref.side:
            assert torch.equal(ref.side[k], out.side[k])


@pytest.mark.parametrize("codec", [TurboQuantCodec(d=64, bits=3), Int8Codec(d=64),
                                   Fp16Codec(d=64)], ids=["turbo3", "int8", "fp16"])
def test_encode_codes_is_the_codecs_encode(codec):
    """encode_codes: new codes of every vector in order, on x's device, as the codec's."""
    gen = torch.Generator().manual_seed(3)
    x, *_ = make(codec, 41, 41, gen, torch.float16)
    ref, out = codec.encode(x.float().cpu()), encode_codes(x, codec)
    assert out.shape == ref.shape and out.payload.device == x.device
    assert out.payload.dtype == ref.payload.dtype and out.side.keys() == ref.side.keys()
    slots = torch.arange(41, device=DEVICE)
    if isinstance(codec, TurboQuantCodec):
        check_turbo(codec, x, Codes(ref.payload.to(DEVICE), {k: v.to(DEVICE) for k, v in
                                                            ref.side.items()}, ref.shape),
                    out, slots)
    else:
        assert torch.equal(out.payload.cpu(), ref.payload)
        for k in ref.side:
            assert torch.equal(out.side[k].cpu(), ref.side[k])


def test_refusals():
    x = torch.randn(4, 64, device=DEVICE)
    pool = Codes(torch.zeros(8, 16, dtype=torch.uint8, device=DEVICE), {}, torch.Size((8, 64)))
    with pytest.raises(ValueError, match="codec.d"):
        encode_pack(x, TurboQuantCodec(d=128, bits=2), pool, torch.arange(4, device=DEVICE))
    with pytest.raises(ValueError, match="slots"):
        encode_pack(x, TurboQuantCodec(d=64, bits=2), pool, torch.arange(3, device=DEVICE))
