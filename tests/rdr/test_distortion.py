"""Distortion matrix, exact single-item errors, fidelity and the problem built from a trace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sphkv.rdr import InfeasibleBudgetError, default_tiers
from sphkv.rdr.distortion import (
    PAGE_TABLE_ENTRY,
    byte_shares,
    distortion_matrix,
    fidelity,
    layer_distortion,
    problem_from_trace,
    true_errors,
)
from sphkv.rdr.tiers import kv_tiers
from sphkv.rdr.utility import KeyNorm, attention_probs
from sphkv.solvers import solve

TIERS = default_tiers(16)


def _layer(h_kv=2, group=2, n=10, w=4, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(h_kv, n, d, generator=gen) * 2, torch.randn(h_kv, n, d, generator=gen),
            torch.randn(h_kv * group, w, d, generator=gen) * 2)


def _reconstruct(tier, k, v):
    if tier.is_drop:
        return None, None
    return tier.key.decode(tier.key.encode(k)), tier.value.decode(tier.value.encode(v))


@pytest.mark.parametrize("tiers", [TIERS, kv_tiers(16)], ids=["default", "kv-pairs"])
def test_layer_distortion_matches_naive_first_order_model(tiers):
    # the kv ladder's pairs share codec objects: each key codec's terms are computed once
    k, v, q = _layer()
    h_kv, n, d = k.shape
    w, g = q.shape[1], q.shape[0] // h_kv
    got = layer_distortion(k, v, q, tiers)
    assert got.shape == (h_kv, n, len(tiers))
    for t, tier in enumerate(tiers):
        k_hat, v_hat = _reconstruct(tier, k, v)
        ref = np.zeros((h_kv, n))
        for h in range(q.shape[0]):
            kv = h // g
            for j in range(w):
                pos = n - w + j
                p = torch.softmax(q[h, j] @ k[kv, :pos + 1].T / math.sqrt(d), 0).double()
                o = p @ v[kv, :pos + 1].double()
                for i in range(pos + 1):
                    dv = v[kv, i].double() - o
                    if tier.is_drop:
                        ref[kv, i] += (p[i] / (1 - p[i])) ** 2 * dv.square().sum()
                    else:
                        e = (q[h, j] @ (k_hat[kv, i] - k[kv, i])).double() / math.sqrt(d)
                        err = e * dv + (v_hat[kv, i] - v[kv, i]).double()
                        ref[kv, i] += p[i] ** 2 * err.square().sum()
        # fp16's error is at float32 rounding of the logits: a looser tolerance
        rtol = 1e-2 if tier.name == "fp16" else 2e-4
        np.testing.assert_allclose(got[..., t], ref, rtol=rtol, atol=1e-12, err_msg=tier.name)
    # fp16 almost none; on the symmetric ladder more bytes, less distortion on average
    means = got.mean(axis=(0, 1))
    assert means[-1] < 1e-4 * means[0]
    if tiers is TIERS:
        assert np.all(np.diff(means) < 0)


def test_true_errors_match_recomputed_attention():
    k, v, q = _layer(n=12, w=5)
    h_kv, n, d = k.shape
    g = q.shape[0] // h_kv
    got = true_errors(k, v, q, TIERS, n_items=9)
    assert got.shape == (h_kv, 9, len(TIERS))

    def outputs(kk, vv, keep):
        out = []
        for h in range(q.shape[0]):
            kv = h // g
            for j in range(q.shape[1]):
                pos = n - q.shape[1] + j
                s = (q[h, j] @ kk[kv, :pos + 1].T / math.sqrt(d)).double()
                s[~keep[kv, :pos + 1]] = -math.inf
                out.append(torch.softmax(s, 0) @ vv[kv, :pos + 1].double())
        return torch.stack(out)

    everything = torch.ones(h_kv, n, dtype=torch.bool)
    base = outputs(k, v, everything)
    for t, tier in enumerate(TIERS):
        k_hat, v_hat = _reconstruct(tier, k, v)
        for h in range(h_kv):
            for i in (0, 3, 8):
                kk, vv, keep = k.clone(), v.clone(), everything.clone()
                if tier.is_drop:
                    keep[h, i] = False
                else:
                    kk[h, i], vv[h, i] = k_hat[h, i], v_hat[h, i]
                ref = (outputs(kk, vv, keep) - base).square().sum().item()
                rel = 5e-2 if tier.name == "fp16" else 1e-3  # fp16: float32 logit rounding
                assert got[h, i, t] == pytest.approx(ref, rel=rel, abs=1e-12), (tier.name, h, i)


@pytest.mark.parametrize("tiers", [TIERS, kv_tiers(16)], ids=["default", "kv-pairs"])
def test_exact_rows_are_the_true_single_item_errors(tiers):
    """``exact``: every row is the output error of moving that one item alone (the drop row
    was already); the first-order rows are not, where the logit errors are large."""
    k, v, q = _layer(n=12, w=12, seed=3)
    k = k * 3  # logits of several units: far from first order at 2 bits
    exact = layer_distortion(k, v, q, tiers, exact=True)
    first = layer_distortion(k, v, q, tiers)
    true = true_errors(k, v, q, tiers)
    for t, tier in enumerate(tiers):
        if tier.is_drop:  # the same row either way (a float32 difference where p nears 1)
            np.testing.assert_array_equal(exact[..., t], first[..., t])
            continue
        rtol = 5e-2 if tier.name == "fp16" else 2e-3  # fp16: float32 logit rounding
        np.testing.assert_allclose(exact[..., t], true[..., t], rtol=rtol, atol=1e-9,
                                   err_msg=tier.name)
    cheapest = 1  # the lowest rung, the largest logit errors
    assert np.abs(first[..., cheapest] / true[..., cheapest] - 1).max() > 0.5
    # a method asks for it
    from sphkv.rdr import METHODS

    method = METHODS["rdr-kv-exact"]
    assert method.exact and method.ladder is METHODS["rdr-kv"].ladder


def test_estimator_weights_keep_the_profile():
    """With an estimator, D uses the window's sorted attention profile handed out in the
    estimator's order: its top token gets the largest mean attention as weight, for every q."""
    k, v, q = _layer(h_kv=1, group=2, n=30, w=6)
    got = layer_distortion(k, v, q, TIERS, KeyNorm())
    p = attention_probs(k, q)  # [1, 2, 6, 30]
    pi = p.mean(dim=(1, 2)).max().double()
    top = int(KeyNorm().score(k, v, q)[0].argmax())
    o = (p @ v[:, None]).double()  # [1, 2, 6, d]
    ref = ((pi / (1 - pi)) ** 2 * (v[0, top].double() - o).square().sum(-1)).sum()
    assert got[0, top, 0] == pytest.approx(ref.item(), rel=1e-6)
    assert np.isfinite(got).all() and (got >= 0).all()


def test_floor_mixes_a_uniform_prior_into_the_weights():
    """With floor α, every weight is (1 − α) p + α / n: a token no observed query attends to
    (its key pushed far away) still costs (α/n / (1 − α/n))² Σ_q ‖v − o_q‖² to drop."""
    k, v, q = _layer(h_kv=1, group=2, n=20, w=5)
    q[..., 0] += 10  # every query leans along e_0 …
    k[0, 3] = 0
    k[0, 3, 0] = -100  # … and token 3's key points away: p ≈ 0 for every query
    alpha, n = 0.1, k.shape[1]
    plain, floored = layer_distortion(k, v, q, TIERS), layer_distortion(k, v, q, TIERS,
                                                                      floor=alpha)
    assert plain[0, 3, 0] < 1e-12
    p = attention_probs(k, q).double()  # [1, 2, 5, 20]
    o = p @ v[:, None].double()
    pi = (1 - alpha) * p + alpha / n
    dist2 = (v[0, 3].double() - o).square().sum(-1)
    ref = ((pi[..., 3] / (1 - pi[..., 3])) ** 2 * dist2).sum()
    assert floored[0, 3, 0] == pytest.approx(ref.item(), rel=1e-6)
    assert floored[0, 3, 0] > 0
    np.testing.assert_array_equal(layer_distortion(k, v, q, TIERS, floor=0.0), plain)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="floor"):
            layer_distortion(k, v, q, TIERS, floor=bad)


def test_expected_prior_mixes_the_expected_attention_of_gaussian_queries():
    """With ``prior="expected"`` the floor mixes in softmax(μ·k/√d + kᵀΣk/2d), averaged over
    the kv-head's query heads, instead of 1/n: the drop row follows those weights."""
    k, v, q = _layer(h_kv=1, group=2, n=20, w=5)
    alpha, d = 0.3, k.shape[-1]
    got = layer_distortion(k, v, q, TIERS, floor=alpha, prior="expected")
    p = attention_probs(k, q).double()  # [1, 2, 5, 20]
    o = p @ v[:, None].double()
    qs = q.double().view(1, 2, 5, d)
    mu = qs.mean(dim=2)  # [1, 2, d]
    cov = torch.stack([torch.cov(qs[0, g].T) for g in range(2)])[None]  # [1, 2, d, d]
    kd = k.double()
    var = torch.einsum("hnd,hgde,hne->hgn", kd, cov, kd) / d
    expected = torch.softmax(mu @ kd.mT / math.sqrt(d) + var / 2, dim=-1).mean(dim=1)  # [1, 20]
    pi = (1 - alpha) * p + alpha * expected[:, None, None]
    dist2 = (v[0][None, None, None].double() - o[..., None, :]).square().sum(-1)  # [1,2,5,20]
    ref = ((pi / (1 - pi)) ** 2 * dist2).sum(dim=(1, 2))[0]
    np.testing.assert_allclose(got[0, :, 0], ref.numpy(), rtol=1e-4)
    # the uniform prior is another ranking; floor 0 ignores the prior
    assert not np.allclose(got, layer_distortion(k, v, q, TIERS, floor=alpha))
    np.testing.assert_array_equal(layer_distortion(k, v, q, TIERS, prior="expected"),
                                  layer_distortion(k, v, q, TIERS))
    with pytest.raises(ValueError, match="prior"):
        layer_distortion(k, v, q, TIERS, floor=alpha, prior="gaussian")


def test_relative_divides_by_the_layer_output_energy():
    k, v, q = _layer(h_kv=2, group=2, n=12, w=4)
    plain = layer_distortion(k, v, q, TIERS)
    o = attention_probs(k, q).double() @ v[:, None].double()
    np.testing.assert_allclose(layer_distortion(k, v, q, TIERS, relative=True),
                               plain / o.square().sum().item(), rtol=1e-6)
    # values three times larger: the relative drop row does not move
    np.testing.assert_allclose(layer_distortion(k, 3 * v, q, TIERS, relative=True)[..., 0],
                               layer_distortion(k, v, q, TIERS, relative=True)[..., 0],
                               rtol=1e-5)  # float32 rounding of ‖v − o‖²


def test_centred_rows_divide_by_the_true_output_energy():
    """Offsets from per-head means: the drop row is that of the vectors themselves (it reads
    only v − o and the attention, which a key shift leaves alone), every row is divided by the
    energy of the true output o + μ, and the quantized rows fall when the offsets are small
    beside the vectors."""
    kc, vc, q = _layer(h_kv=2, group=2, n=12, w=4)  # the offsets
    gen = torch.Generator().manual_seed(3)
    mu_k, mu_v = (4 * torch.randn(2, 1, 16, generator=gen) for _ in range(2))
    k, v = kc + mu_k, vc + mu_v
    o = attention_probs(k, q).double() @ v[:, None].double()
    centred = layer_distortion(kc, vc, q, TIERS, relative=True, value_mean=mu_v[:, 0])
    np.testing.assert_allclose(centred, layer_distortion(kc, vc, q, TIERS)
                               / o.square().sum().item(), rtol=1e-6)
    raw = layer_distortion(k, v, q, TIERS, relative=True)
    np.testing.assert_allclose(centred[..., 0], raw[..., 0], rtol=1e-4)
    # the offsets' norms are a fraction of the vectors': every quantized tier's error falls
    assert np.all(centred[..., 1:-1].mean(axis=(0, 1)) < raw[..., 1:-1].mean(axis=(0, 1)))


@pytest.mark.parametrize("tiers", [TIERS, kv_tiers(16)], ids=["default", "kv-pairs"])
def test_head_weights_sum_the_query_heads_weighed(tiers):
    """D sums each query head's terms: with weights w, D = Σ_g w[h, g] · D of query head g
    alone (its kv-head's keys and values, that head's queries), the drop row too."""
    k, v, q = _layer(h_kv=2, group=3, n=12, w=4)
    weights = torch.tensor([[0.5, 2.0, 7.0], [1.0, 0.1, 3.0]])
    got = layer_distortion(k, v, q, tiers, floor=0.5, head_weights=weights.flatten())
    per_head = q.view(2, 3, 4, 16)
    want = sum(weights[:, g, None, None].double().numpy()
               * layer_distortion(k, v, per_head[:, g], tiers, floor=0.5) for g in range(3))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match=r"one weight per query head \(6\), got 4"):
        layer_distortion(k, v, q, tiers, head_weights=torch.ones(4))


def test_problem_from_trace(small_trace):
    t = small_trace
    problem = problem_from_trace(t, TIERS, 0.5, sinks=4)
    n_items = t.layers * t.kv_heads * t.tokens
    assert problem.n_items == n_items and problem.n_tiers == len(TIERS)
    assert problem.tier_names == TIERS.names and problem.page_size == 16
    assert problem.page_overhead == PAGE_TABLE_ENTRY.itemsize == 12
    assert problem.budget == pytest.approx(0.5 * problem.full_cost())
    assert np.array_equal(problem.groups, np.repeat(np.arange(t.layers * t.kv_heads), t.tokens))
    forced = problem.forced.reshape(t.layers, t.kv_heads, t.tokens)
    assert np.all(forced[..., :4] == len(TIERS) - 1) and np.all(forced[..., -t.window:] == 5)
    assert np.all(forced[..., 4:-t.window] == -1)
    np.testing.assert_allclose(problem.distortion.reshape(t.layers, t.kv_heads, t.tokens, -1),
                               distortion_matrix(t, TIERS))
    assert problem_from_trace(t, TIERS, 20_000.0, recent=8).budget == 20_000.0
    done = []
    problem_from_trace(t, TIERS, 0.5, on_layer=done.append)
    assert done == list(range(1, t.layers + 1))
    assert problem_from_trace(t, TIERS, 0.5, estimator="keydiff").n_items == n_items
    with pytest.raises(InfeasibleBudgetError):
        problem_from_trace(t, TIERS, 0.01)
    with pytest.raises(ValueError, match="head dimension 64"):
        problem_from_trace(t, default_tiers(64), 0.5)
    with pytest.raises(ValueError, match="unknown estimator"):
        problem_from_trace(t, TIERS, 0.5, estimator="nope")


@pytest.mark.parametrize("method", ["greedy", "lp", "ilp"])
def test_solve_trace_and_byte_shares(small_trace, method):
    t = small_trace
    problem = problem_from_trace(t, TIERS, 0.4)
    alloc = solve(problem, method, time_limit=20)
    shares = byte_shares(problem, alloc.tiers, t.layers, t.kv_heads)
    assert shares.shape == (t.layers, t.kv_heads)
    assert shares.sum() == pytest.approx(alloc.cost) and alloc.cost <= problem.budget + 1e-6


@pytest.mark.parametrize("holdout", [False, True])
def test_fidelity_tiny(small_trace, holdout):
    report = fidelity(small_trace, TIERS, holdout=holdout)
    assert len(report.pooled) == small_trace.layers and report.items > 0
    assert min(report.pooled) > 0.5
    assert set(report.per_tier) == set(TIERS.names[:-1])


def test_fidelity_of_the_exact_rows_in_sample_is_one(small_trace):
    # in sample and without a prior the exact rows are the true errors: they rank them
    exact = fidelity(small_trace, TIERS, holdout=False, exact=True)
    first = fidelity(small_trace, TIERS, holdout=False)
    assert min(exact.pooled) > 0.999 and min(exact.pooled) >= min(first.pooled)


@pytest.mark.slow
def test_fidelity_on_real_trace(smollm2_trace):
    """Predicted distortion ranks the true attention-output error, per layer, on SmolLM2."""
    tiers = default_tiers(smollm2_trace.head_dim)
    in_sample = fidelity(smollm2_trace, tiers, holdout=False)
    held_out = fidelity(smollm2_trace, tiers, holdout=True)
    assert len(in_sample.pooled) == 30
    assert min(in_sample.pooled) > 0.8 and min(held_out.pooled) > 0
    assert held_out.median > 0.5
    for rhos in held_out.per_tier.values():
        assert np.median(rhos) > 0
