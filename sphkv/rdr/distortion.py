"""The distortion matrix of a KV trace, measured with real codecs, and the allocation problem.

For one kv-head, its observation queries q (the window's queries of all its query heads) attend
with weights ``p_qi`` (causal softmax of ``q·k_i/√d``) and output ``o_q = Σ_i p_qi v_i``.
Storing item i at tier t changes its logit by ``e_qi = q·(k̂_i − k_i)/√d`` (what the key codes'
``logits`` give, to rounding) and its value by ``Δv_i = v̂_i − v_i``. To first order
(``∂o/∂s_i = p_i (v_i − o)``) the output moves by ``p_qi (e_qi (v_i − o_q) + Δv_i)``, so

    D[i, t]    = Σ_q p_qi² ‖e_qi (v_i − o_q) + Δv_i‖²
    D[i, drop] = Σ_q p_qi² / (1 − p_qi)² ‖v_i − o_q‖²

The drop row is exact for one dropped item (the others' weights grow by 1/(1 − p)); the
quantized rows keep the two squared terms and add the measured cross term
``2 e_qi (v_i − o_q)·Δv_i`` instead of assuming independence. With ``exact``, the quantized
rows are exact for one item too: with ``E = e^{e_qi}`` its weight becomes ``pE / (1 + p(E − 1))``
and the output moves by ``g ((E − 1)(v_i − o_q) + E Δv_i)``, ``g = p / (1 + p(E − 1))``, which
is the first-order term where ``e`` is small and bounded where it is not (a 2-bit key of a
token that holds most of a query's attention).

With a utility estimator (:mod:`sphkv.rdr.utility`) the measured weights are replaced by
predicted ones: the kv-head's attention profile (its mean window attention, sorted) is handed
out in the estimator's order, ``π_i = sorted profile[rank of score_i]``, the same for every
query. The estimator decides who gets attention; the window decides how peaked it is.

:func:`fidelity` checks the model against the true attention-output error of actually dropping
or quantizing one item (softmax recomputed exactly), per layer, as a Spearman rank correlation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import spearmanr

from sphkv.rdr.problem import AllocationProblem, budget_to_bytes
from sphkv.rdr.tiers import Tier, TierSet
from sphkv.rdr.utility import Estimator, ExpectedAttention, attention_probs, get_estimator

__all__ = ["PAGE_TABLE_ENTRY", "PRIORS", "FidelityReport", "byte_shares", "distortion_matrix",
           "fidelity", "layer_distortion", "problem_from_trace", "true_errors"]

#: One page-table entry per page: the page's slot in its tier's pool, the
#: position of its first token, how many of its slots are valid and its tier. Its size is the
#: ``page_overhead`` of a trace's allocation problem.
PAGE_TABLE_ENTRY = np.dtype([("page_id", "<u4"), ("first_position", "<u4"), ("valid", "<u2"),
                             ("tier", "<u2")])
_MAX_P = 1 - 1e-6  # a lone visible token (p = 1) cannot be dropped; cap 1/(1 - p)
#: the priors :func:`layer_distortion` can mix into the observed attention
PRIORS = ("uniform", "expected")


def _grouped(queries: torch.Tensor, h_kv: int) -> torch.Tensor:
    """``[H_q, W, d]`` → ``[H_kv, G·W, d]``: each kv-head's queries, head-major."""
    return queries.reshape(h_kv, -1, queries.shape[-1])


def _deltas(tier: Tier, keys: torch.Tensor, values: torch.Tensor):
    """``k̂ − k`` and ``v̂ − v`` ``[H_kv, n, d]`` of a non-drop tier, through its codecs."""
    return tier.key.reconstruct(keys) - keys, tier.value.reconstruct(values) - values


def _logit_error(dk: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``e_qi = q·(k̂_i − k_i)/√d`` ``[H_kv, G, W, n]`` from ``dk = k̂ − k``. A key codec's
    ``logits`` equal ``q·k̂`` to rounding (:meth:`~sphkv.codec.Codec.logits`); the difference
    is taken before the product, so that it does not cancel."""
    h_kv, d = dk.shape[0], dk.shape[-1]
    q = _grouped(queries.float(), h_kv)
    return (q @ dk.mT / d**0.5).view(h_kv, -1, queries.shape[1], dk.shape[1])


def _weights(keys, values, queries, estimator: Estimator | None, score_queries=None,
             first=None):
    """Measured ``p`` and the weights ``π`` the distortion uses, both ``[H_kv, G, W, n]``;
    the estimator scores with ``score_queries`` (default: ``queries``)."""
    p = attention_probs(keys, queries, first)
    if estimator is None:
        return p, p
    h_kv, n = keys.shape[0], keys.shape[1]
    profile = p.mean(dim=(1, 2)).sort(dim=-1, descending=True).values  # [H_kv, n]
    scores = estimator.score(keys, values, queries if score_queries is None else score_queries)
    order = scores.argsort(dim=-1, descending=True)
    pi = keys.new_empty(h_kv, n).scatter_(1, order, profile)  # rank r gets the r-th largest weight
    return p, pi[:, None, None].expand_as(p)


def layer_distortion(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                     tiers: TierSet, estimator: Estimator | None = None,
                     score_queries: torch.Tensor | None = None, floor: float = 0.0,
                     relative: bool = False, first: torch.Tensor | None = None,
                     blocks: int = 1, prior: str = "uniform",
                     head_weights: torch.Tensor | None = None,
                     exact: bool = False,
                     value_mean: torch.Tensor | None = None) -> np.ndarray:
    """Distortion ``D[h, i, t]`` of one layer (module docstring), float64 ``[H_kv, n, T]``.

    Parameters
    ----------
    keys, values : torch.Tensor
        ``[H_kv, n, d]``.
    queries : torch.Tensor
        ``[H_q, W, d]``, the queries of positions ``n-W … n-1``.
    tiers : TierSet
        The ladder; each non-drop tier's key and value codecs encode the layer.
    estimator : Estimator, optional
        Replace the measured attention weights by the estimator's (module docstring).
    score_queries : torch.Tensor, optional
        ``[H_q, m, d]``, the queries of positions ``n-m … n-1`` the estimator scores with
        (H2O's accumulated attention reads every prefill query); ``queries`` by default.
    floor : float
        Weight ``α`` in [0, 1) of a uniform prior on the attention of queries not observed:
        ``π ← (1 − α) π + α / n``. The observed queries are a sample; a token none of them
        attends to gets ``D ≈ 0`` at every tier and would be dropped for free, though later
        queries may read it. The floor makes every drop cost something, so when the budget
        allows, cheap rungs are preferred to drops.
    prior : str
        The distribution mixed in with weight ``floor``: ``"uniform"`` (``1/n``) or
        ``"expected"``, the expected attention of future queries drawn from a Gaussian fitted
        to each query head's observed queries (:class:`~sphkv.rdr.utility.ExpectedAttention`
        without the value norm, averaged over the kv-head's query heads), so the prior leans
        towards the tokens unobserved queries are likely to read.
    relative : bool
        Divide by the layer's output energy ``Σ_q ‖o_q‖²`` (all its heads): D becomes the
        squared output error relative to the layer's output, so that one allocation over
        several layers weighs each layer's relative error (what the evaluation's fidelity
        task reports) instead of favouring the layers whose outputs are largest.
    first : torch.Tensor, optional
        int ``[W]``: the lowest token index query j sees (a sliding or chunked layer's
        pattern, :class:`~sphkv.rdr.layout.LayerAttention`); every earlier token by default.
    blocks : int
        The heads are ``blocks`` equal blocks of independent layers (or sequences) stacked, each
        one ``relative`` to its own output energy: one call for several layers of the same shape.
    head_weights : torch.Tensor, optional
        ``[H_q]``: each query head's output error weighed by ``s_h`` (its sensitivity,
        :func:`sphkv.integrations.hf.sensitivity.head_sensitivity`): ``D = Σ_h s_h Σ_q …``,
        the loss's second-order change ``½ δᵀFδ`` for a Fisher ``F`` that is ``s_h / d`` times
        the identity on head h's output. With it, leave ``relative`` off: the weights give the
        layers' scales.
    exact : bool
        Quantized rows exact for one item (module docstring) instead of first order in the
        logit error.
    value_mean : torch.Tensor, optional
        ``[H_kv, d]``: ``values`` are offsets from these means (centred storage,
        :attr:`~sphkv.rdr.methods.Method.centred`), so the true output is ``o + μ``; only
        ``relative``'s energy reads it, every row depends on the values through differences
        ``v − o`` and the codecs' own errors alone.
    """
    if not 0 <= floor < 1:
        raise ValueError(f"floor must be in [0, 1), got {floor}")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}")
    keys, values, queries = keys.float(), values.float(), queries.float()
    p, pi = _weights(keys, values, queries, estimator, score_queries, first)
    if prior == "uniform" or floor == 0:
        pi = (1 - floor) * pi + floor / keys.shape[1]
    else:
        expected = ExpectedAttention(value_norm=False).score(keys, values, queries)  # [H_kv, n]
        pi = (1 - floor) * pi + floor * expected[:, None, None]
    # each query's weight on its head's output error: 1, or the head's sensitivity
    s: torch.Tensor | float = 1.0
    if head_weights is not None:
        if head_weights.numel() != pi.shape[0] * pi.shape[1]:
            raise ValueError(f"head_weights must hold one weight per query head "
                             f"({pi.shape[0] * pi.shape[1]}), got {head_weights.numel()}")
        s = head_weights.float().to(keys.device).view(*pi.shape[:2], 1, 1)
    w = pi.square() * s
    o = p @ values[:, None]  # o_q [H_kv, G, W, d]
    v = values[:, None]  # [H_kv, 1, n, d]
    # ‖v_i − o_q‖² = ‖v_i‖² − 2 v_i·o_q + ‖o_q‖², [H_kv, G, W, n], in float64: where one
    # token holds nearly all the weight, o_q ≈ v_i cancels, and the drop row multiplies the
    # difference by 1/(1 − p)²
    o64, v64 = o.double(), v.double()
    dist2 = (v64.square().sum(-1)[:, :, None] - 2 * o64 @ v64.mT
             + o64.square().sum(-1)[..., None]).clamp_min(0).float()
    # a quantized row splits into its key codec's terms and its value codec's delta, so a
    # ladder of (key, value) pairs sharing codec objects computes each codec once:
    # Σ_q π² e (e ‖v − o‖² + 2 (v − o)·Δv) + Σ_q π² ‖Δv‖²
    #   = Σ_q π² e² ‖v − o‖² + 2 (a v − b)·Δv + Σ_q π² ‖Δv‖², a = Σ_q π² e, b = Σ_q π² e o_q
    key_terms: dict = {}
    value_deltas: dict = {}
    w_sum = w.sum(dim=(1, 2))  # Σ_q π², [H_kv, n]
    out = []
    for tier in tiers:
        if tier.is_drop:
            r = pi.clamp(max=_MAX_P)
            d = ((r / (1 - r)).square() * s * dist2).sum(dim=(1, 2))
        else:
            if id(tier.key) not in key_terms:
                e = _logit_error(tier.key.reconstruct(keys) - keys, queries)
                if exact:  # e → E − 1, Δv → E Δv, π → g (module docstring)
                    grow = e.clamp(max=30).exp()
                    g2 = (pi / (1 + pi * (grow - 1))).square() * s
                    we, e, c = g2 * grow * (grow - 1), grow - 1, (g2 * grow.square()).sum((1, 2))
                    e2 = (g2 * e.square() * dist2).sum(dim=(1, 2))
                else:
                    we, c = w * e, w_sum
                    e2 = (we * e * dist2).sum(dim=(1, 2))
                key_terms[id(tier.key)] = (e2, we.sum(dim=(1, 2)),
                                           torch.einsum("hgqi,hgqd->hid", we, o), c)
            if id(tier.value) not in value_deltas:
                value_deltas[id(tier.value)] = tier.value.reconstruct(values) - values
            e2, a, b, c = key_terms[id(tier.key)]
            dv = value_deltas[id(tier.value)]
            d = e2 + 2 * ((a[..., None] * values - b) * dv).sum(-1) + c * dv.square().sum(-1)
        out.append(d.clamp_min(0))
    out = torch.stack(out, dim=-1).double()
    if relative:
        if value_mean is not None:
            o64 = o64 + value_mean.to(o64)[:, None, None]
        energy = o64.square().sum(dim=(1, 2, 3)).view(blocks, -1).sum(dim=1)
        out /= energy.clamp_min(1e-300).repeat_interleave(keys.shape[0] // blocks)[:, None, None]
    return out.cpu().numpy()


def distortion_matrix(trace, tiers: TierSet, estimator: Estimator | str | None = None,
                      on_layer: Callable[[int], None] | None = None) -> np.ndarray:
    """``D`` ``[L, H_kv, n, T]`` of a :class:`sphkv.integrations.hf.Trace`; ``on_layer(done)``
    is called after each layer (a progress bar's hook)."""
    if isinstance(estimator, str):
        estimator = get_estimator(estimator)
    if tiers.d != trace.head_dim:
        raise ValueError(f"tiers are for head dimension {tiers.d}, the trace has "
                         f"{trace.head_dim}")
    rows = []
    for i in range(trace.layers):
        rows.append(layer_distortion(trace.keys[i], trace.values[i], trace.queries[i], tiers,
                                     estimator, first=_first_seen(trace, i)))
        if on_layer is not None:
            on_layer(i + 1)
    return np.stack(rows)


def _first_seen(trace, layer: int) -> torch.Tensor | None:
    """``[W]``: the lowest token index each window query of ``layer`` sees (None: every earlier
    token, a full-attention layer)."""
    attention = trace.layout[layer]
    if attention.is_full:
        return None
    first = attention.first_visible(trace.positions[-trace.window:], torch.tensor(0))
    return torch.searchsorted(trace.positions, first)


def invisible(trace) -> np.ndarray:
    """bool ``[L, n]``: tokens the query after the trace can no longer see (a sliding or
    chunked layer's), which the model's own cache does not hold."""
    nxt = trace.positions[-1:] + 1
    return np.stack([(trace.positions < a.first_visible(nxt, torch.tensor(0))).numpy()
                     for a in trace.layout])


def true_errors(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                tiers: TierSet, n_items: int | None = None) -> np.ndarray:
    """True output error of moving one item alone to each tier, float64 ``[H_kv, n_items, T]``.

    ``Σ_q ‖o'_q − o_q‖²`` with the softmax recomputed exactly: with item i's logit moved by
    ``ε`` (−∞ for drop), its weight becomes ``p' = p e^ε / (1 − p + p e^ε)``, the others shrink
    by ``(1 − p')/(1 − p)``, and ``o' − o = r o + p' v̂_i − (r + 1) p v_i`` with
    ``r = p (1 − e^ε) / (1 − p + p e^ε)`` (``p / (1 − p)`` for drop). Queries are those of the
    last ``W`` positions of the ``n`` keys; only the first ``n_items`` tokens are perturbed.
    """
    keys, values, queries = keys.float(), values.float(), queries.float()
    n_items = keys.shape[1] if n_items is None else n_items
    probs = attention_probs(keys, queries)
    o = (probs @ values[:, None]).double()  # [H_kv, G, W, d]
    p = probs.double()[..., :n_items]
    v = values.double()[:, None, :n_items]  # [H_kv, 1, n_items, d]
    oo = o.square().sum(-1)[..., None]
    ov = o @ v.mT
    vv = v.square().sum(-1)[:, :, None]
    out = np.empty((keys.shape[0], n_items, len(tiers)))
    for t, tier in enumerate(tiers):
        if tier.is_drop:
            r = p / (1 - p.clamp(max=_MAX_P))
            err = r.square() * (oo - 2 * ov + vv)  # ‖r (o − v)‖²
        else:
            dk, dv = _deltas(tier, keys, values)
            eps = _logit_error(dk, queries).double()[..., :n_items]
            v_hat = values + dv
            grow = eps.exp()
            den = 1 - p + p * grow
            r, p_new = p * (1 - grow) / den, p * grow / den
            vh = v_hat.double()[:, None, :n_items]
            a, b, c = r, p_new, -(r + 1) * p  # o' − o = a o + b v̂ + c v
            err = (a.square() * oo + b.square() * vh.square().sum(-1)[:, :, None]
                   + c.square() * vv + 2 * a * b * (o @ vh.mT) + 2 * a * c * ov
                   + 2 * b * c * (vh * v).sum(-1)[:, :, None])
        out[:, :, t] = err.clamp_min(0).sum(dim=(1, 2)).numpy()
    return out


@dataclass
class FidelityReport:
    """How well the distortion model ranks true attention-output errors, per layer.

    Attributes
    ----------
    pooled : list of float
        Per layer, Spearman ρ between predicted ``D[i, t]`` and the true error over all free
        items and the non-fp16 tiers together.
    per_tier : dict of str to list of float
        Per tier (drop and the compressed tiers), per layer, ρ over the free items: does the
        model rank tokens within one tier?
    holdout : bool
        True when ``D`` came from the first half of the window and the true error from the
        later queries (future queries the prediction never saw).
    estimator : str
        ``"window"`` (measured attention) or the estimator's class name.
    items : int
        Free items per layer that entered the correlation.
    """

    pooled: list[float]
    per_tier: dict[str, list[float]]
    holdout: bool
    estimator: str
    items: int
    tiers: list[str] = field(default_factory=list)

    @property
    def median(self) -> float:
        return float(np.median(self.pooled))

    def to_dict(self) -> dict:
        return {"pooled": self.pooled, "per_tier": self.per_tier, "holdout": self.holdout,
                "estimator": self.estimator, "items": self.items, "median": self.median}


def fidelity(trace, tiers: TierSet, estimator: Estimator | str | None = None,
             holdout: bool = True, sinks: int = 4, floor: float = 0.0,
             prior: str = "uniform", exact: bool = False) -> FidelityReport:
    """Spearman ρ per layer between predicted distortion and the true single-item error.

    With ``holdout``, the first half of the window predicts (``D`` from a trace cut at
    ``n' = n − W/2`` tokens, whose window is that first half) and the true error is measured with
    the last ``W/2`` queries on the whole cache; items in the prediction's window and the
    ``sinks`` first tokens, forced to fp16 in an allocation, are left out. Without it, both use
    the whole window (a check of the first-order model alone). ``floor``, ``prior`` and
    ``exact`` are :func:`layer_distortion`'s (a method's distortion model).
    """
    if isinstance(estimator, str):
        estimator = get_estimator(estimator)
    w = trace.window
    if holdout and w < 2:
        raise ValueError("holdout needs a window of at least 2 queries")
    n_pred = trace.tokens - w // 2 if holdout else trace.tokens
    w_pred = w - w // 2 if holdout else w
    free = slice(sinks, n_pred - w_pred)
    if free.stop - free.start < 2:
        raise ValueError(f"the trace has no free items to rank ({trace.tokens} tokens, window "
                         f"{w}, {sinks} sinks)")
    compared = [t for t in range(len(tiers)) if t != len(tiers) - 1]
    pooled, per_tier = [], {tiers[t].name: [] for t in compared}
    for layer in range(trace.layers):
        k, v, q = trace.keys[layer], trace.values[layer], trace.queries[layer]
        pred = layer_distortion(k[:, :n_pred], v[:, :n_pred], q[:, :w_pred], tiers, estimator,
                                floor=floor, prior=prior, exact=exact)
        true = true_errors(k, v, q[:, w - w // 2:] if holdout else q, tiers, n_pred)
        pred, true = pred[:, free][..., compared], true[:, free][..., compared]
        pooled.append(float(spearmanr(pred.ravel(), true.ravel()).statistic))
        for j, t in enumerate(compared):
            per_tier[tiers[t].name].append(
                float(spearmanr(pred[..., j].ravel(), true[..., j].ravel()).statistic))
    return FidelityReport(pooled, per_tier, holdout,
                          "window" if estimator is None else type(estimator).__name__,
                          trace.kv_heads * (free.stop - free.start), tiers.names)


def problem_from_trace(trace, tiers: TierSet, budget: float,
                       estimator: Estimator | str | None = None, page_size: int = 16,
                       sinks: int = 4, recent: int | None = None,
                       on_layer: Callable[[int], None] | None = None) -> AllocationProblem:
    """The allocation problem of a trace: one item per (layer, kv-head, token).

    Parameters
    ----------
    trace : sphkv.integrations.hf.Trace
        Keys, values ``[L, H_kv, n, d]`` and window queries ``[L, H_q, W, d]``.
    tiers : TierSet
        The precision ladder (e.g. ``default_tiers(trace.head_dim)``); drop first, fp16 last.
    budget : float
        A number in (0, 1] is a fraction of the all-fp16 cost (pages and page-table entries
        included); above 1 it is bytes (:func:`sphkv.rdr.budget_to_bytes`).
    estimator : Estimator or str, optional
        Utility estimator for the attention weights of ``D``; measured window attention if
        omitted.
    page_size : int
        Tokens per page; a page holds one (layer, kv-head) and one tier.
    sinks, recent : int
        The first ``sinks`` tokens and the last ``recent`` (default: the window W) are forced to
        the last tier (fp16).
    on_layer : callable, optional
        ``on_layer(done)`` after each layer's distortion rows (a progress bar's hook).

    A sliding or chunked layer's tokens that the next query cannot see are forced to drop, and a
    budget given as a fraction refers to what the model's own fp16 cache holds (those tokens
    left out).

    Returns
    -------
    AllocationProblem
        ``N = L·H_kv·n`` items ordered (layer, kv-head, token); ``groups = layer·H_kv + head``;
        ``cost`` the tiers' bytes per token-head; ``page_overhead`` the bytes of one
        :data:`PAGE_TABLE_ENTRY`.
    """
    recent = trace.window if recent is None else recent
    if sinks < 0 or recent < 0:
        raise ValueError(f"sinks and recent must be >= 0, got {sinks} and {recent}")
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    d = distortion_matrix(trace, tiers, estimator, on_layer)
    layers, h_kv, n, t = d.shape
    token = np.tile(np.arange(n), layers * h_kv)
    gone = np.repeat(invisible(trace), h_kv, axis=0).reshape(-1)  # [L·H_kv·n], item order
    forced = np.where((token < sinks) | (token >= n - recent), t - 1, -1)
    forced = np.where(gone, 0, forced)
    problem = AllocationProblem(
        distortion=d.reshape(-1, t), cost=tiers.costs, budget=1e300,
        groups=np.repeat(np.arange(layers * h_kv), n), page_size=page_size,
        page_overhead=PAGE_TABLE_ENTRY.itemsize, forced=forced, tier_names=tiers.names)
    # the model's own cache: every token it still holds at fp16
    full = problem.cost_of(np.where(gone, 0, t - 1))
    return problem.with_budget(budget_to_bytes(budget, full))


def byte_shares(problem: AllocationProblem, tiers: np.ndarray, layers: int,
                kv_heads: int) -> np.ndarray:
    """Bytes an allocation gives each (layer, kv-head), whole pages included, ``[L, H_kv]``.

    Needs the item order and groups of :func:`problem_from_trace`.
    """
    pages = -(-problem.counts(tiers) // problem.page_size)  # whole pages per (group, tier)
    return (pages * problem.page_bytes).sum(axis=1).reshape(layers, kv_heads)
