"""The diagnostic decode kernel of ``benchmarks/ops/decode_anatomy.py`` against its torch
reference, every mode: what it times must be a correct attention over what its codes mean."""

from __future__ import annotations

import pytest
import torch

from benchmarks.ops.decode_anatomy import (
    ASM_MODES,
    MODES,
    anatomy_decode,
    anatomy_naive,
    make_case,
)
from sphkv.codec import TurboQuantCodec
from tests.kernels.common import DEVICE, assert_close


@pytest.mark.parametrize("mode", MODES)
def test_anatomy_kernel_matches_reference(mode, nan_empty):
    if mode in ASM_MODES and DEVICE == "cpu":
        pytest.skip("inline PTX runs on a GPU only (the interpreter runs no assembly)")
    gen = torch.Generator().manual_seed(MODES.index(mode))
    lev = torch.as_tensor(TurboQuantCodec(d=32, bits=4).quantizer.levels,
                          dtype=torch.float32).to(DEVICE)
    case = make_case(mode, 3, 2, 53, 32, lev, gen, DEVICE)  # 53: a ragged last block
    out = anatomy_decode(mode, case, 32**-0.5, splits=2, block_n=16)
    assert_close(mode, anatomy_naive(mode, case, 32**-0.5).cpu(), out.cpu(), 2e-2)
