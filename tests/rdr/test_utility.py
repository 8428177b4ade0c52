"""Utility estimators against naive per-head, per-query references; GQA aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from sphkv.rdr.utility import (
    ESTIMATORS,
    AccumulatedAttention,
    ExpectedAttention,
    KeyDiff,
    KeyNorm,
    ManifoldKV,
    NormalizedAttention,
    WindowAttention,
    WindowedManifoldKV,
    attention_probs,
    get_estimator,
)


def _layer(h_kv=2, group=3, n=37, w=9, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(h_kv, n, d, generator=gen) * 2
    v = torch.randn(h_kv, n, d, generator=gen)
    q = torch.randn(h_kv * group, w, d, generator=gen) * 2
    return k, v, q


def _naive_probs(k, q):
    """p[h, j, :] for query head h and window query j, by loops (zero after the query)."""
    h_kv, n, d = k.shape
    h_q, w, _ = q.shape
    p = torch.zeros(h_q, w, n)
    for h in range(h_q):
        kv = h // (h_q // h_kv)
        for j in range(w):
            pos = n - w + j
            s = torch.stack([q[h, j] @ k[kv, i] for i in range(pos + 1)]) / math.sqrt(d)
            p[h, j, : pos + 1] = torch.softmax(s, 0)
    return p


def _per_kv(x, h_kv, how="mean"):
    """[H_q, n] -> [H_kv, n], query head h belonging to kv-head h // G."""
    g = x.shape[0] // h_kv
    return torch.stack([getattr(x[i * g:(i + 1) * g], how)(0) if how == "mean" else
                        x[i * g:(i + 1) * g].max(0).values for i in range(h_kv)])


SHAPES = [dict(h_kv=2, group=3, n=37, w=9, d=16), dict(h_kv=3, group=1, n=20, w=20, d=8),
          dict(h_kv=1, group=4, n=50, w=1, d=32)]
IDS = ["Hkv2-G3-N37-W9-D16", "Hkv3-G1-N20-W20-D8", "Hkv1-G4-N50-W1-D32"]


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_attention_probs(shape):
    k, _, q = _layer(**shape)
    p = attention_probs(k, q)
    ref = _naive_probs(k, q)
    torch.testing.assert_close(p.reshape(ref.shape), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("how", ["mean", "max"])
def test_attention_estimators_match_naive(shape, how):
    k, v, q = _layer(**shape)
    h_kv, n, w = k.shape[0], k.shape[1], q.shape[1]
    p = _naive_probs(k, q)  # [H_q, W, n]
    # H2O: summed over the window's queries
    ref = _per_kv(p.sum(1), h_kv, how)
    torch.testing.assert_close(AccumulatedAttention(aggregate=how).score(k, v, q), ref)
    # ZipCache: divided by how many window queries see each token
    seen = torch.tensor([sum(1 for j in range(w) if i <= n - w + j) for i in range(n)])
    torch.testing.assert_close(NormalizedAttention(aggregate=how).score(k, v, q),
                               _per_kv(p.sum(1) / seen, h_kv, how))
    # SnapKV: mean over the window, then a 3-wide average over neighbours (edges: fewer)
    mean = p.mean(1)
    pooled = torch.stack([mean[:, max(i - 1, 0):i + 2].mean(1) for i in range(n)], 1)
    torch.testing.assert_close(WindowAttention(kernel_size=3, aggregate=how).score(k, v, q),
                               _per_kv(pooled, h_kv, how))
    torch.testing.assert_close(WindowAttention(kernel_size=1, aggregate=how).score(k, v, q),
                               _per_kv(mean, h_kv, how))


def test_expected_attention_matches_naive():
    k, v, q = _layer(h_kv=2, group=2, n=25, w=12, d=8)
    d = k.shape[-1]
    rows = []
    for h in range(4):
        kv = h // 2
        mu, cov = q[h].mean(0), torch.cov(q[h].T)
        e = torch.stack([mu @ k[kv, i] / math.sqrt(d) + k[kv, i] @ cov @ k[kv, i] / (2 * d)
                         for i in range(k.shape[1])])
        rows.append(torch.softmax(e, 0) * v[kv].norm(dim=-1))
    torch.testing.assert_close(ExpectedAttention().score(k, v, q), _per_kv(torch.stack(rows), 2),
                               rtol=1e-4, atol=1e-6)


def test_query_agnostic_estimators_match_naive():
    k, v, q = _layer(h_kv=2, group=3, n=30, w=5, d=16)
    c = k.mean(1, keepdim=True)
    torch.testing.assert_close(ManifoldKV().score(k, v, q), (k - c).norm(dim=-1))
    anchor = (k / k.norm(dim=-1, keepdim=True)).mean(1)
    cos = torch.stack([torch.stack([k[h, i] @ anchor[h] / (k[h, i].norm() * anchor[h].norm())
                                    for i in range(30)]) for h in range(2)])
    torch.testing.assert_close(KeyDiff().score(k, v, q), 1 - cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(KeyNorm().score(k, v, q), 1 / k.norm(dim=-1))
    w = 7
    local = torch.stack([torch.stack([k[h, max(i - 3, 0):min(max(i - 3, 0) + w, 30)].mean(0)
                                      for i in range(30)]) for h in range(2)])
    torch.testing.assert_close(WindowedManifoldKV(window=w).score(k, v, q),
                               (k - local).norm(dim=-1), rtol=1e-5, atol=1e-5)
    # a window covering the whole cache is the global ManifoldKV
    torch.testing.assert_close(WindowedManifoldKV(window=1000).score(k, v, q),
                               ManifoldKV().score(k, v, q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_on_a_trace(name, small_trace):
    t = small_trace
    est = get_estimator(name)
    for layer in range(t.layers):
        s = est.score(t.keys[layer], t.values[layer], t.queries[layer])
        assert s.shape == (t.kv_heads, t.tokens) and s.dtype == torch.float32
        assert torch.isfinite(s).all() and (s >= 0).all()


def test_errors():
    k, v, q = _layer()
    with pytest.raises(ValueError, match="multiple of kv-heads"):
        WindowAttention().score(k, v, q[:5])
    with pytest.raises(ValueError, match="keys and values"):
        KeyNorm().score(k, v[:, 1:], q)
    with pytest.raises(ValueError, match="longer than the cache"):
        KeyNorm().score(k[:, :3], v[:, :3], q)
    with pytest.raises(ValueError, match="kernel_size"):
        WindowAttention(kernel_size=4)
    with pytest.raises(ValueError, match="aggregate"):
        AccumulatedAttention(aggregate="sum")
    with pytest.raises(ValueError, match="unknown estimator 'nope'"):
        get_estimator("nope")
