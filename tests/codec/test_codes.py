"""``Codes`` rows, device moves, concatenation and reshapes keep each vector's codes; each codec
declares the kernel kind that reads it."""

import pytest
import torch

from sphkv.codec import (
    Codes,
    Fp16Codec,
    Int8Codec,
    KernelKind,
    KiviCodec,
    PolarQuantCodec,
    SphericalCodec,
    TurboQuantCodec,
)

D = 16
CODECS = [Fp16Codec(d=D), Int8Codec(d=D), TurboQuantCodec(d=D, bits=3), SphericalCodec(d=D),
          PolarQuantCodec(d=D)]


def flat(codec, n=7, seed=0):
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))
    return x, codec.encode(x)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: type(c).__name__)
def test_rows_select_vectors(codec):
    _, codes = flat(codec)
    full = codec.decode(codes)
    index = torch.tensor([[4, 0, 4], [6, 1, 2]])
    picked = codes.rows(index)
    assert picked.shape == (2, 3, D) and picked.num_vectors == 6
    torch.testing.assert_close(codec.decode(picked), full[index])
    mask = torch.tensor([True, False, True, False, False, False, True])
    assert codes.rows(mask).shape == (3, D)
    torch.testing.assert_close(codec.decode(codes.rows(mask)), full[mask])
    torch.testing.assert_close(codec.decode(codes.rows(slice(2, 5))), full[2:5])


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: type(c).__name__)
def test_cat_and_reshape_keep_vectors(codec):
    _, a = flat(codec, n=5, seed=1)
    _, b = flat(codec, n=3, seed=2)
    both = Codes.cat([a, b])
    assert both.shape == (8, D) and both.nbytes == a.nbytes + b.nbytes
    torch.testing.assert_close(codec.decode(both),
                               torch.cat([codec.decode(a), codec.decode(b)]))
    _, six = flat(codec, n=6, seed=3)
    grid = six.reshape(2, 3)
    assert grid.shape == (2, 3, D)
    torch.testing.assert_close(codec.decode(grid), codec.decode(six).reshape(2, 3, D))
    torch.testing.assert_close(codec.decode(grid.reshape(6)), codec.decode(six))


def test_to_moves_every_tensor():
    _, codes = flat(TurboQuantCodec(d=D, bits=2))
    moved = codes.to("meta")
    assert moved.payload.device.type == "meta" and moved.shape == codes.shape
    assert moved.side.keys() == codes.side.keys()
    assert all(v.device.type == "meta" for v in moved.side.values())
    assert codes.payload.device.type == "cpu"  # the original stays where it was


def test_codecs_declare_their_kernel():
    assert Fp16Codec(d=D).KERNEL == KernelKind.FP16
    assert Int8Codec(d=D).KERNEL == KernelKind.INT8
    assert TurboQuantCodec(d=D, bits=4).KERNEL == KernelKind.TURBO
    assert SphericalCodec(d=D).KERNEL == KernelKind.ADA
    assert KiviCodec(d=D, bits=2).KERNEL is None and PolarQuantCodec(d=D).KERNEL is None
