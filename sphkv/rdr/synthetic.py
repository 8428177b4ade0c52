"""A realistic synthetic allocation problem, for the demo, tests and solver benchmarks.

Shaped like the KV cache of a small Llama-style model: ``layers × kv_heads`` page groups of
``tokens`` items. Utilities (expected future attention) are heavy-tailed: log-normal per token
with a per-layer and per-head spread, attention sinks at the start, and a rise towards the
recent end. The distortion of item i at tier t is ``u_i · e_t · ξ_it``, with ``e_t`` the relative
error of the tier (1 for drop, 0 for fp16) and ``ξ`` a log-normal jitter, so tiers are not
uniformly good for every token. Sinks and the recent window are forced to fp16.
"""

from __future__ import annotations

import numpy as np

from sphkv.rdr.problem import AllocationProblem

__all__ = ["SYNTHETIC_TIERS", "synthetic_problem"]

# name: (bytes per token-head for key + value at head dim 64, relative error of the tier).
# Bytes: d·bits/8 for keys and for values plus a 2-byte fp16 scale or radius each.
SYNTHETIC_TIERS = {
    "drop": (0, 1.0),
    "2bit": (2 * (64 * 2 // 8 + 2), 0.12),
    "3bit": (2 * (64 * 3 // 8 + 2), 0.035),
    "4bit": (2 * (64 * 4 // 8 + 2), 0.0095),
    "int8": (2 * (64 + 2), 4e-5),
    "fp16": (2 * 64 * 2, 0.0),
}


def synthetic_problem(layers: int = 30, kv_heads: int = 3, tokens: int = 1024,
                      budget_fraction: float = 0.125, page_size: int | None = 16,
                      page_overhead: float = 16.0, sinks: int = 4, recent: int = 16,
                      seed: int = 0) -> AllocationProblem:
    """A synthetic problem with ``layers * kv_heads * tokens`` items and the six tiers above.

    ``budget_fraction`` is the budget as a fraction of the all-fp16 cost (pages included).
    """
    if min(layers, kv_heads, tokens) < 1:
        raise ValueError("layers, kv_heads and tokens must be >= 1")
    if sinks + recent > tokens:
        raise ValueError(f"sinks + recent ({sinks + recent}) exceed tokens ({tokens})")
    rng = np.random.default_rng(seed)
    groups = layers * kv_heads
    position = np.tile(np.arange(tokens), groups)
    spread = rng.uniform(0.8, 2.2, groups)  # some heads are far more peaked than others
    scale = rng.lognormal(0.0, 1.0, groups)
    log_u = rng.standard_normal(groups * tokens) * np.repeat(spread, tokens)
    recency = 1.0 + 2.0 * (position / tokens) ** 8
    utility = np.repeat(scale, tokens) * np.exp(log_u) * recency
    names = list(SYNTHETIC_TIERS)
    cost = np.array([SYNTHETIC_TIERS[n][0] for n in names], dtype=float)
    error = np.array([SYNTHETIC_TIERS[n][1] for n in names])
    jitter = rng.lognormal(0.0, 0.3, (utility.size, len(names)))
    distortion = utility[:, None] * error[None, :] * jitter
    forced = np.where((position < sinks) | (position >= tokens - recent), len(names) - 1, -1)
    problem = AllocationProblem(
        distortion=distortion, cost=cost, budget=1e18,
        groups=np.repeat(np.arange(groups), tokens), page_size=page_size,
        page_overhead=page_overhead if page_size else 0.0, forced=forced, tier_names=names,
    )
    return problem.with_budget(budget_fraction * problem.full_cost())
