"""The online allocator's admissions at model scale, without a model.

An :class:`~sphkv.rdr.online.OnlineAllocator` over the default ladder (d = 64, pages of 16) is
prefilled with ``--tokens`` tokens in each of ``--groups`` groups (groups are (sequence, layer,
kv-head): 1,024 is a batch of 8 on a Llama-3.2-1B-shaped model), then admits W = ``--window``
new tokens per group ``--admissions`` times, as a decode does every W steps. Keys and values
are random fp16; distortion rows are random, decreasing with the tier, 0 at fp16; the first 4
tokens of each group are sinks forced to fp16. The budget is ``--fraction`` of the all-fp16
store, so the store fills and admissions demote (``overflowed``: how many solved for demotions
rather than fitting at the price). Runs are unordered, as a full-attention layer's are
(``--ordered``: sorted by position, as a sliding layer's, so that every run an admission
touches is rewritten).

Per row: ``items`` kept after the prefill, ``prefill_s``, the median, mean and largest
admission (``admit_ms``, ``admit_mean_ms``, ``admit_max_ms``), the median time to read every
tier's runs of every group after an admission (``runs_ms``: the page tables the decode kernels
are given, rebuilt after each write), and the store's bytes against its budget at the end.
Timed on ``--device`` (synchronised after each step on a GPU).

``OMP_NUM_THREADS=1 taskset -c 0 python -m benchmarks.run --op admission``
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from sphkv.rdr.online import OnlineAllocator, Tokens
from sphkv.rdr.pages import slot_bytes
from sphkv.rdr.tiers import default_tiers

_D, _SINKS = 64, 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--groups", type=int, nargs="+", default=[128, 1024],
                        help="page groups, one per (sequence, layer, kv-head)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024],
                        help="prefill tokens per group")
    parser.add_argument("--admissions", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.25,
                        help="budget as a share of the all-fp16 store")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--window", type=int, default=16,
                        help="W: new tokens per group at each admission")
    parser.add_argument("--ordered", action="store_true",
                        help="keep every run sorted by position, as a sliding layer's groups "
                             "are (default: unordered, as a full-attention layer's)")


def result_name(args) -> str:
    """``admission.json``, or ``admission_ordered.json`` for ``--ordered`` runs."""
    return "admission_ordered" if args.ordered else "admission"


def _tokens(groups: int, lo: int, hi: int, device: torch.device,
            rng: np.random.Generator) -> Tokens:
    """Positions lo … hi-1 of every group, with random vectors and distortion rows."""
    n = hi - lo
    positions = np.tile(np.arange(lo, hi), groups)
    # D[i, t] = u_i · e_t: a per-item weight times a per-tier error falling to 0 at fp16
    error = np.array([1.0, 0.2, 0.08, 0.03, 0.002, 0.0])
    distortion = rng.lognormal(0.0, 1.5, (groups * n, 1)) * error[None, :]
    keys, values = (torch.randn(groups * n, _D, device=device).half() for _ in range(2))
    return Tokens(np.repeat(np.arange(groups), n), torch.from_numpy(positions), keys, values,
                  distortion, np.where(positions < _SINKS, len(error) - 1, -1))


def _timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    tiers = default_tiers(_D)
    rows = []
    w = args.window
    for groups, tokens in itertools.product(args.groups, args.tokens):
        rng = np.random.default_rng(groups + tokens)
        total = tokens + args.admissions * w
        budget = args.fraction * groups * total * slot_bytes(tiers[len(tiers) - 1])
        alloc = OnlineAllocator(tiers, groups, budget, 16, device=device, ordered=args.ordered)
        prefill = _timed(lambda a=alloc, g=groups, n=tokens, r=rng:
                         a.prefill(_tokens(g, 0, n, device, r)), device)
        admits, reads = [], []
        everyone = list(range(groups))
        for i in range(args.admissions):
            new = _tokens(groups, tokens + i * w, tokens + (i + 1) * w, device, rng)
            admits.append(_timed(lambda a=alloc, new=new: a.admit(new), device))
            reads.append(_timed(lambda s=alloc.store, g=everyone: [s.runs(t, g)
                                                                   for t in s.pools],
                                device))
        ms = np.asarray(admits) * 1e3
        rows.append(dict(groups=groups, tokens=tokens, window=w,
                         items=groups * tokens, prefill_s=prefill,
                         admit_ms=float(np.median(ms)), admit_mean_ms=float(ms.mean()),
                         admit_max_ms=float(ms.max()),
                         runs_ms=float(np.median(reads) * 1e3),
                         overflowed=alloc.demotion_solves, store_bytes=alloc.nbytes(),
                         budget_bytes=int(budget), ordered=args.ordered))
    return rows
