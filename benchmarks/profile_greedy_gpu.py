"""Profile greedy_tiers on a GPU (cProfile of the host side, syncs included)."""

import cProfile
import pstats
import sys

import array_api_compat
import torch

from benchmarks.ops.solvers import instance
from sphkv.solvers.greedy import greedy_tiers

xp = array_api_compat.array_namespace(torch.empty(0))
for items in map(int, sys.argv[1:]):
    p = instance(items, paged=False, budget=0.125)
    free = p.forced < 0
    cost = p.amortized_cost()
    room = p.budget - cost[p.forced[~free]].sum() - cost.min() * free.sum()
    d = torch.as_tensor(p.distortion[free], device="cuda")
    c = torch.as_tensor(cost, device="cuda")
    greedy_tiers(d, c, room, xp=xp)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    greedy_tiers(d, c, room, xp=xp)
    torch.cuda.synchronize()
    prof.disable()
    print(f"=== {items:,} items")
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
