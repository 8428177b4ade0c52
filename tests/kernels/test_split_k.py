"""The split-K merges against a log-sum-exp merge in torch (float64): split counts below, at and
several blocks past the merge's ``S_BLOCK`` (a non-multiple too), empty splits (``lse = −∞``,
their partial outputs finite garbage that must weigh 0), whole blocks of empty splits before the
first token, and ``lse`` spread over ±60 so that rescaling the running sums matters. Outputs are
NaN-poisoned (``torch.empty`` is filled with NaN while a kernel runs)."""

from __future__ import annotations

import inspect

import pytest
import torch

from sphkv.kernels import split_k
from tests.kernels.common import DEVICE

S_BLOCK = inspect.signature(split_k.merge_kernel.fn).parameters["S_BLOCK"].default
assert S_BLOCK == inspect.signature(
    split_k.merge_two_domains_kernel.fn).parameters["S_BLOCK"].default

# below a block, one block less three, one block, three blocks, four blocks and a part
SPLITS = [1, S_BLOCK - 3, S_BLOCK, 3 * S_BLOCK, 4 * S_BLOCK + 5]
NEG_INF = float("-inf")


def make_partials(rows, num_splits, D, seed):
    """Partials ``[rows, num_splits, D]`` and ``lse [rows, num_splits]`` in ±60, with rows of
    special patterns first (those that fit in ``rows``):

    0. ``lse`` rising from −60 to 60: every block raises the running max;
    1. every split but the last empty: whole blocks of −∞ before the first token;
    2. about half the splits empty, at random, all but the middle one;
    3. ``lse`` falling from 60 to −60: the first block holds the max.
    """
    gen = torch.Generator().manual_seed(seed)
    o = torch.randn(rows, num_splits, D, generator=gen)
    lse = torch.rand(rows, num_splits, generator=gen) * 120 - 60
    lse[0] = torch.linspace(-60, 60, num_splits)
    lse[1, :-1] = NEG_INF
    empty = torch.rand(num_splits, generator=gen) < 0.5
    empty[num_splits // 2] = False
    lse[2, empty] = NEG_INF
    lse[3] = torch.linspace(60, -60, num_splits)
    return o, lse


def reference(o, lse, rotated=None):
    """``Σ_s 2^(lse_s − M) o_s / Σ_s 2^(lse_s − M)`` per row in float64, summed apart per domain
    when ``rotated`` is given (``[rows, 2, D]``, 0 for a row with no token)."""
    o, lse = o.double(), lse.double()
    m = lse.max(1, keepdim=True).values
    w = torch.exp2(lse - torch.where(m == NEG_INF, 0.0, m))
    total = w.sum(1, keepdim=True)
    inv = torch.where(total > 0, 1 / torch.where(total > 0, total, 1.0), 0.0)
    if rotated is None:
        return (w[..., None] * o).sum(1) * inv
    rot = rotated.bool()
    parts = [((w * (rot == r))[..., None] * o).sum(1) * inv for r in (False, True)]
    return torch.stack(parts, 1)


@pytest.mark.parametrize("num_splits", SPLITS, ids=[f"S{s}" for s in SPLITS])
def test_merge(nan_empty, num_splits):
    B, Hq, D = 2, 3, 16
    o, lse = make_partials(B * Hq, num_splits, D, seed=num_splits)
    # out[b, h] at strides of a [B, Hq + 1, D] tensor: the row strides are the kernel's to use
    out = torch.empty(B, Hq + 1, D, device=DEVICE)[:, :Hq]
    split_k.merge_kernel[(B * Hq,)](o.to(DEVICE), lse.to(DEVICE), out, num_splits,
                                    out.stride(0), out.stride(1), HQ=Hq, D=D)
    torch.testing.assert_close(out.reshape(B * Hq, D).cpu().double(), reference(o, lse),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_splits", SPLITS, ids=[f"S{s}" for s in SPLITS])
def test_merge_two_domains(nan_empty, num_splits):
    rows, D = 6, 32
    o, lse = make_partials(rows, num_splits, D, seed=100 + num_splits)
    lse[4] = NEG_INF  # a row with no token at all: 0
    gen = torch.Generator().manual_seed(num_splits)
    rotated = torch.randint(0, 2, (num_splits,), generator=gen, dtype=torch.int32)
    out = torch.empty(rows, 2, D, device=DEVICE)
    split_k.merge_two_domains_kernel[(rows,)](o.to(DEVICE), lse.to(DEVICE),
                                              rotated.to(DEVICE), out, num_splits, D=D)
    out = out.cpu()
    assert not out.isnan().any()
    assert (out[4] == 0).all()
    torch.testing.assert_close(out.double(), reference(o, lse, rotated), rtol=1e-5, atol=1e-6)
