"""Interface invariants of every registered codec."""

from __future__ import annotations

import math

import pytest
import torch

from sphkv.codec import (
    Codes,
    HypersphericalCodec,
    KiviCodec,
    SphericalCodec,
    TurboQuantCodec,
    get_codec,
)


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """``out`` within ``ratio`` of ``ref`` in max abs error relative to max abs of ``ref``."""
    err = (ref - out).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= ratio * scale, f"{name}: max error {err:.3g} > {ratio} x {scale:.3g}"


def keys(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# B2-H3-N96: 96 tokens (a multiple of KIVI's 32-token groups), odd heads
SHAPE = (2, 3, 96)


def test_nbytes_equals_n_times_bytes_per_vector(codec):
    codes = codec.encode(keys((*SHAPE, codec.d)))
    n = math.prod(SHAPE)
    assert isinstance(codes, Codes)
    assert codes.payload.dtype == torch.uint8
    assert codes.nbytes == n * codec.bytes_per_vector
    assert codes.num_vectors == n


def test_codes_are_bit_packed(codec):
    # a payload of one byte per code would exceed the stated bits per coordinate
    codes = codec.encode(keys((*SHAPE, codec.d)))
    assert codes.payload.shape[-1] * 8 <= codec.bits_per_coordinate * codec.d


def test_decode_within_stated_bound(codec):
    x = keys((*SHAPE, codec.d), seed=1)
    x_hat = codec.decode(codec.encode(x))
    assert x_hat.shape == x.shape and x_hat.dtype == torch.float32
    rel = ((x - x_hat).norm(dim=-1) / x.norm(dim=-1)).max().item()
    assert rel <= codec.error_bound(), f"relative error {rel} above bound {codec.error_bound()}"


def test_reconstruct_is_decode_of_encode(codec):
    # KIVI's per-channel groups: 96 tokens are whole groups; 3-bit TurboQuant is a case below
    x = keys((*SHAPE, codec.d), seed=2)
    assert torch.equal(codec.reconstruct(x), codec.decode(codec.encode(x)))


@pytest.mark.parametrize("levels", ["lloyd-max", "uniform"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_turbo_reconstruct_skips_packing_exactly(bits, levels):
    codec = TurboQuantCodec(d=64, bits=bits, levels=levels)
    x = keys((5, 7, 64), seed=bits)
    assert torch.equal(codec.reconstruct(x), codec.decode(codec.encode(x)))
    with pytest.raises(ValueError, match="finite"):
        codec.reconstruct(torch.full((2, 64), float("nan")))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_turbo_unbiased_keeps_the_component_along_x(bits):
    """``⟨x̂, x⟩ = ‖x‖²`` to the fp16 rounding of the stored norm, where the MSE codebook's
    reconstruction is shorter along x, on average by the error's share of the energy; same
    codes, same bytes."""
    x = keys((200, 64), seed=bits) * 3
    plain, unbiased = (TurboQuantCodec(d=64, bits=bits, unbiased=u) for u in (False, True))
    a, b = plain.encode(x), unbiased.encode(x)
    assert torch.equal(a.payload, b.payload) and b.nbytes == a.nbytes
    along = (unbiased.decode(b) * x).sum(-1) / x.square().sum(-1)
    torch.testing.assert_close(along, torch.ones(200), rtol=0, atol=2.0**-10)
    shrunk = (plain.decode(a) * x).sum(-1) / x.square().sum(-1)
    assert shrunk.mean() < 1 - 0.5 * plain.quantizer.mse
    # a zero vector stays zero
    assert torch.equal(unbiased.reconstruct(torch.zeros(1, 64)), torch.zeros(1, 64))


def test_kivi_channel_error_within_half_a_step():
    codec = KiviCodec(d=64, bits=2, axis="channel")
    x = keys((64, 64), seed=2) * torch.linspace(0.1, 10, 64)  # outlier channels
    codes = codec.encode(x)
    step = codes.side["scale"].float().repeat_interleave(32, dim=0)  # [n, d]
    err = (x - codec.decode(codes)).abs()
    assert (err <= step / 2 * (1 + 1e-3) + 1e-5 * x.abs().max()).all()


def test_logits_equal_q_dot_decode(codec):
    x = keys((*SHAPE, codec.d), seed=3)
    q = keys((2, 3, 5, codec.d), seed=4)
    codes = codec.encode(x)
    out = codec.logits(q, codes)
    assert out.shape == (2, 3, 5, SHAPE[-1])
    assert_close("logits", q @ codec.decode(codes).mT, out, 1e-5)


def test_logits_broadcast_query_heads(codec):
    # GQA: one kv head [1, n, d] read by several query heads [3, m, d]
    x = keys((1, 64, codec.d), seed=5)
    q = keys((3, 2, codec.d), seed=6)
    codes = codec.encode(x)
    assert_close("logits", q @ codec.decode(codes).mT, codec.logits(q, codes), 1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_non_finite(codec, bad):
    x = keys((32, codec.d))
    x[3, 5] = bad
    for call in (codec.encode, codec.reconstruct):
        with pytest.raises(ValueError, match="x must be finite"):
            call(x)


def test_rejects_wrong_d(codec):
    with pytest.raises(ValueError, match=f"last dimension d={codec.d}"):
        codec.encode(keys((32, codec.d + 2)))


def test_rejects_bad_query(codec):
    codes = codec.encode(keys((32, codec.d)))
    with pytest.raises(ValueError, match="q must"):
        codec.logits(keys((4, codec.d // 2)), codes)


def test_rejects_integer_input(codec):
    with pytest.raises(ValueError, match="floating-point"):
        codec.encode(torch.ones(32, codec.d, dtype=torch.int32))


@pytest.mark.parametrize("name", ["ada", "turbo", "fib"])
def test_power_of_two_required(name):
    with pytest.raises(ValueError, match="d must be a power of two"):
        get_codec(name, d=96)


@pytest.mark.parametrize(("name", "params", "field"), [
    ("ada", dict(d=64, bits=(4, 2)), "bits"),
    ("ada", dict(d=64, bits=(0, 2, 2, 2, 2, 2)), r"bits\[0\]"),
    ("ada", dict(d=64, bits=(4, 2, 2, 9, 2, 2)), r"bits\[3\]"),
    ("hyperspherical", dict(d=64, bits=0), "bits"),
    ("kivi", dict(d=64, axis="row"), "axis"),
    ("kivi", dict(d=64, group_size=48, axis="token"), "group_size"),
    ("turbo", dict(d=64, bits=9), "bits"),
    ("turbo", dict(d=64, levels="even"), "levels"),
    ("polar", dict(d=64, pairing="diagonal"), "pairing"),
    ("polar", dict(d=63), "d must be even"),
    ("fib", dict(d=64, block=3), "block"),
    ("fib", dict(d=64, direction_bits=13), "direction_bits"),
])
def test_config_errors_name_the_field(name, params, field):
    with pytest.raises(ValueError, match=field):
        get_codec(name, **params)


def test_unknown_codec():
    with pytest.raises(ValueError, match="unknown codec 'zip'; available: ada"):
        get_codec("zip", d=64)


def test_kivi_channel_needs_whole_groups():
    with pytest.raises(ValueError, match="multiple of group_size=32"):
        KiviCodec(d=64).encode(keys((40, 64)))


def test_fp16_overflow_is_an_error():
    with pytest.raises(ValueError, match="fp16 maximum"):
        SphericalCodec(d=64).encode(keys((4, 64)) * 1e5)


def test_hyperspherical_without_rotation_any_d():
    codec = HypersphericalCodec(d=96, bits=6, rotate=False)
    x = keys((10, 96))
    assert ((x - codec.decode(codec.encode(x))).norm(dim=-1) / x.norm(dim=-1)).max() < 0.2


def test_spherical_zero_vector():
    codec = SphericalCodec(d=64)
    assert codec.decode(codec.encode(torch.zeros(3, 64))).abs().max() == 0


@pytest.mark.parametrize("rate", [2.0, 3.0, 4.0])
@pytest.mark.parametrize("d", [64, 128])
def test_for_rate_meets_rate_and_beats_flat_bits(d, rate):
    codec = SphericalCodec.for_rate(d, rate)
    assert codec.bits_per_coordinate <= rate
    # against the same number of bits spread flat over the levels
    from sphkv.analysis.bounds import predicted_mse

    flat_b = max(1, int((rate * d - 16) // (d - 1)))
    flat = SphericalCodec(d=d, bits=(flat_b,) * int(math.log2(d)))
    if flat.bits_per_coordinate <= rate:
        assert predicted_mse(codec) <= predicted_mse(flat)


def test_codes_on_other_dtypes():
    codec = SphericalCodec(d=64)
    x = keys((8, 64))
    out16 = codec.decode(codec.encode(x.half()))
    out32 = codec.decode(codec.encode(x.half().float()))
    assert torch.equal(out16, out32)


def test_turbo_three_bits_in_two_planes():
    """3-bit TurboQuant codes: byte i holds the low two bits of codes 4i … 4i + 3 (code 4i + f
    at bits 2f, 2f + 1), byte d/4 + j the high bits of codes 8j … 8j + 7 (code 8j + k at bit k)."""
    codec = TurboQuantCodec(d=32, bits=3)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    y = codec.rotation.forward(x)
    c = codec.quantizer.quantize(y / y.norm(dim=-1, keepdim=True) * 32**0.5)
    low = ((c & 3).view(5, 8, 4) << torch.arange(0, 8, 2)).sum(-1)
    high = ((c >> 2).view(5, 4, 8) << torch.arange(8)).sum(-1)
    assert torch.equal(codec.encode(x).payload.long(), torch.cat([low, high], -1))
