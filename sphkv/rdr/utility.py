"""Utility estimators: how much future attention each cached token of each kv-head will get.

Every estimator is a small dataclass with one method, ``score(keys, values, queries)``, over one
layer of a trace:

- ``keys``, ``values`` ``[H_kv, n, d]``: the cache (keys after RoPE);
- ``queries`` ``[H_q, W, d]``: the queries of the last W positions ``n-W … n-1`` (the
  observation window), query head h reading kv-head ``h // (H_q // H_kv)`` (GQA);

and returns scores ``[H_kv, n]``, larger = more useful. Query-aware estimators aggregate the
query heads of a kv-head (mean by default, max as in AdaKV). Scores rank tokens; how a ranking
becomes a distortion is :func:`sphkv.rdr.distortion.distortion_matrix`'s business.

``ESTIMATORS`` maps a name to a default-configured estimator.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

__all__ = ["ESTIMATORS", "AccumulatedAttention", "Estimator", "ExpectedAttention", "KeyDiff",
           "KeyNorm", "ManifoldKV", "NormalizedAttention", "WindowAttention",
           "WindowedManifoldKV", "attention_probs", "get_estimator"]


def _check(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> None:
    if keys.dim() != 3 or values.shape != keys.shape:
        raise ValueError(f"keys and values must both be [H_kv, n, d], got {tuple(keys.shape)} "
                         f"and {tuple(values.shape)}")
    if queries.dim() != 3 or queries.shape[-1] != keys.shape[-1]:
        raise ValueError(f"queries must be [H_q, W, d] with d={keys.shape[-1]}, got "
                         f"{tuple(queries.shape)}")
    if queries.shape[0] % keys.shape[0]:
        raise ValueError(f"query heads ({queries.shape[0]}) must be a multiple of kv-heads "
                         f"({keys.shape[0]})")
    if queries.shape[1] > keys.shape[1]:
        raise ValueError(f"the window ({queries.shape[1]} queries) is longer than the cache "
                         f"({keys.shape[1]} tokens)")


def attention_probs(keys: torch.Tensor, queries: torch.Tensor,
                    first: torch.Tensor | None = None) -> torch.Tensor:
    """Causal softmax attention of the window's queries, grouped by kv-head.

    Parameters
    ----------
    keys : torch.Tensor
        ``[H_kv, n, d]``.
    queries : torch.Tensor
        ``[H_q, W, d]`` at positions ``n-W … n-1``.
    first : torch.Tensor, optional
        int ``[W]``: query j sees tokens ``first[j] … n-W+j`` (a sliding or chunked layer);
        every token up to its own by default.

    Returns
    -------
    torch.Tensor
        float32 ``[H_kv, G, W, n]`` with ``G = H_q // H_kv``: ``p[g, h, j, i]`` is the attention
        of query j of the g-th kv-head's h-th query head on token i (0 for i after the query).
    """
    h_kv, n, d = keys.shape
    h_q, w, _ = queries.shape
    q = queries.float().view(h_kv, h_q // h_kv, w, d)
    s = q @ keys.float()[:, None].mT / math.sqrt(d)  # logits q·k/√d, [H_kv, G, W, n]
    token = torch.arange(n, device=keys.device)
    hidden = token[None, :] > token[n - w:, None]  # [W, n], the future
    if first is not None:
        hidden |= token[None, :] < torch.as_tensor(first).to(keys.device)[:, None]
    return torch.softmax(s.masked_fill(hidden, -math.inf), dim=-1)


def _aggregate(x: torch.Tensor, how: str) -> torch.Tensor:
    """``[H_kv, G, n]`` → ``[H_kv, n]`` over the query heads of each kv-head."""
    return x.mean(dim=1) if how == "mean" else x.amax(dim=1)


@dataclass
class Estimator(ABC):
    """Base of the utility estimators; subclasses only write :meth:`_score`.

    Attributes
    ----------
    all_queries : bool
        Class attribute: the cache should pass every prefill query, not only the observation
        window (accumulated attention sums over all of them).
    """

    all_queries: ClassVar[bool] = False

    def score(self, keys: torch.Tensor, values: torch.Tensor,
              queries: torch.Tensor) -> torch.Tensor:
        """Utility scores ``[H_kv, n]`` (float32) of one layer; larger = keep.

        Parameters
        ----------
        keys, values : torch.Tensor
            ``[H_kv, n, d]``.
        queries : torch.Tensor
            ``[H_q, W, d]``, the last W positions.
        """
        _check(keys, values, queries)
        return self._score(keys.float(), values.float(), queries.float())

    @abstractmethod
    def _score(self, keys: torch.Tensor, values: torch.Tensor,
               queries: torch.Tensor) -> torch.Tensor: ...


@dataclass
class _QueryAware(Estimator):
    """An estimator that reads the window's queries; ``aggregate`` combines a group's heads."""

    aggregate: str = "mean"

    def __post_init__(self) -> None:
        if self.aggregate not in ("mean", "max"):
            raise ValueError(f"aggregate must be 'mean' or 'max', got {self.aggregate!r}")


@dataclass
class WindowAttention(_QueryAware):
    """Observation-window attention (SnapKV): the window queries' mean attention on each token,
    smoothed by average pooling over ``kernel_size`` neighbouring tokens (1: no pooling), so a
    kept token keeps its neighbours' context.

    Based on Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
    arXiv 2404.14469.
    """

    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.kernel_size, int) or self.kernel_size < 1 or \
                self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {self.kernel_size!r}")

    def _score(self, keys, values, queries):
        p = attention_probs(keys, queries).mean(dim=2)  # [H_kv, G, n]
        if self.kernel_size > 1:
            p = F.avg_pool1d(p, self.kernel_size, stride=1, padding=self.kernel_size // 2,
                             count_include_pad=False)
        return _aggregate(p, self.aggregate)


@dataclass
class AccumulatedAttention(_QueryAware):
    """Accumulated attention (H2O, "heavy hitters"): the sum of the attention each token got from
    the given queries. H2O accumulates over every query so far, so ``all_queries`` asks the
    cache for every prefill query; from a trace, capture it with ``--window`` equal to
    ``--tokens`` for that, a shorter window accumulates over its queries only.

    Based on Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
    Language Models", arXiv 2306.14048.
    """

    all_queries: ClassVar[bool] = True

    def _score(self, keys, values, queries):
        return _aggregate(attention_probs(keys, queries).sum(dim=2), self.aggregate)


@dataclass
class NormalizedAttention(_QueryAware):
    """ZipCache's normalized attention: accumulated attention divided by the number of queries
    that can see the token (causality gives early tokens more), so late tokens are not
    penalised for having been seen less.

    Based on He et al., "ZipCache: Accurate and Efficient KV Cache Quantization with Salient
    Token Identification", arXiv 2405.14256.
    """

    def _score(self, keys, values, queries):
        p = attention_probs(keys, queries)  # [H_kv, G, W, n]
        n, w = keys.shape[1], queries.shape[1]
        # token i is seen by the queries at positions max(i, n-W) … n-1
        seen_by = (n - torch.arange(n, device=keys.device).clamp(min=n - w)).float()
        return _aggregate(p.sum(dim=2) / seen_by, self.aggregate)


@dataclass
class ExpectedAttention(_QueryAware):
    """Expected attention under a Gaussian model of future queries.

    With future queries q ~ N(μ, Σ) (mean and covariance of each query head's window), the
    expected unnormalised attention is E[exp(q·k/√d)] = exp(μ·k/√d + kᵀΣk / 2d); the scores are
    its softmax over tokens, times ‖v‖ when ``value_norm`` (a token moves the output in
    proportion to its value). The window's post-RoPE queries stand in for the future ones; the
    paper also averages the RoPE rotation of the next positions.

    Based on Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention
    from Future Queries Distribution", arXiv 2510.00636.
    """

    value_norm: bool = True

    def _score(self, keys, values, queries):
        h_kv, n, d = keys.shape
        q = queries.view(h_kv, -1, queries.shape[1], d)  # [H_kv, G, W, d]
        mu = q.mean(dim=2)  # [H_kv, G, d]
        centred = q - mu[:, :, None]
        cov = centred.mT @ centred / max(q.shape[2] - 1, 1)  # [H_kv, G, d, d]
        mean_logit = mu @ keys.mT / math.sqrt(d)  # μ·k/√d, [H_kv, G, n]
        var_logit = torch.einsum("hnd,hgde,hne->hgn", keys, cov, keys) / d  # kᵀΣk/d
        p = torch.softmax(mean_logit + var_logit / 2, dim=-1)
        if self.value_norm:
            p = p * values.norm(dim=-1)[:, None]
        return _aggregate(p, self.aggregate)


@dataclass
class ManifoldKV(Estimator):
    """Euclidean distance of each key to the centroid of its kv-head's keys: outliers in
    direction or in norm are the informative tokens. Query-agnostic.

    Based on Datta et al., "ManifoldKV: Training-Free KV Cache Compression via Euclidean
    Outlier Detection", arXiv 2602.08343.
    """

    def _score(self, keys, values, queries):
        return (keys - keys.mean(dim=1, keepdim=True)).norm(dim=-1)


@dataclass
class WindowedManifoldKV(Estimator):
    """ManifoldKV against a local centroid: the mean of the ``window`` keys centred on each
    token, so a long context's drifting key distribution does not dilute one global centroid.

    The authors' write-up cuts the context into consecutive windows of 4096 tokens, each token
    scored against its own window's centroid; here the window slides with the token (no token
    sits at a window's edge) and is 512 tokens by default, for contexts of 1k–8k tokens rather
    than the paper's 64k.

    Based on Datta et al., "ManifoldKV: Training-Free KV Cache Compression via Euclidean
    Outlier Detection", arXiv 2602.08343 (WindowedManifoldKV).
    """

    window: int = 512

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive integer, got {self.window!r}")

    def _score(self, keys, values, queries):
        n = keys.shape[1]
        # local mean over tokens [i - w//2, i + w - w//2) ∩ [0, n) from a prefix sum
        prefix = F.pad(keys.cumsum(dim=1), (0, 0, 1, 0))  # [H_kv, n + 1, d]
        lo = (torch.arange(n, device=keys.device) - self.window // 2).clamp(0, n)
        hi = (lo + self.window).clamp(max=n)
        centroid = (prefix[:, hi] - prefix[:, lo]) / (hi - lo)[:, None].float()
        return (keys - centroid).norm(dim=-1)


@dataclass
class KeyDiff(Estimator):
    """KeyDiff: keys that point away from the anchor (the mean unit key) are kept. The score is
    the cosine distance ``1 - cos(k, anchor)``, which orders tokens as KeyDiff's ``-cos``.
    Query-agnostic.

    Based on Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM
    Inference in Resource-Constrained Environments", arXiv 2504.15364.
    """

    def _score(self, keys, values, queries):
        anchor = F.normalize(keys, dim=-1).mean(dim=1, keepdim=True)
        return 1 - F.cosine_similarity(keys, anchor, dim=-1)


@dataclass
class KeyNorm(Estimator):
    """Key norm: keys of small L2 norm draw high attention, so the score is ``1 / ‖k‖`` (the
    order of the paper's ``-‖k‖``). Query-agnostic.

    Based on Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
    Compression", arXiv 2406.11430.
    """

    def _score(self, keys, values, queries):
        return 1 / keys.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)


#: name -> estimator with its default configuration
ESTIMATORS: dict[str, Estimator] = {
    "snapkv": WindowAttention(),
    "h2o": AccumulatedAttention(),
    "expected": ExpectedAttention(),
    "manifoldkv": ManifoldKV(),
    "manifoldkv-windowed": WindowedManifoldKV(),
    "keydiff": KeyDiff(),
    "keynorm": KeyNorm(),
    "zipcache": NormalizedAttention(),
}


def get_estimator(name: str) -> Estimator:
    """The estimator registered as ``name``."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown estimator {name!r}; available: {', '.join(ESTIMATORS)}") \
            from None
