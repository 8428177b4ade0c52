"""Perplexity of RDR against the number of prompt queries its prefill allocation observes.

For each observation count one prefill of N tokens, then for each budget a compressed copy
(``SphkvCache.compress``) scores the next M tokens in chunks of 16 — the sweep's perplexity
task with ``observation`` varied. Prints one line per cell.

    python -m benchmarks.rdr_observation --text ../shared/data/austen/pride_and_prejudice.txt.gz \\
        --observations 16 64 256 1024 --budgets 0.125 0.25
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from sphkv.integrations.hf import load_model, read_tokens
from sphkv.integrations.hf.cache import SphkvCache
from sphkv.integrations.hf.generate import _sphkv_attention
from sphkv.integrations.hf.methods import METHODS, get_method
from sphkv.integrations.hf.tasks import budget_bytes
from sphkv.rdr.problem import InfeasibleBudgetError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, required=True, help="text file (.gz allowed)")
    parser.add_argument("--context", type=int, default=1024, help="N, prefilled tokens")
    parser.add_argument("--scored", type=int, default=128, help="M, scored tokens")
    parser.add_argument("--observations", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.125, 0.25],
                        help="fractions of the fp16 cache")
    parser.add_argument("--method", default="rdr", choices=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    n, m, chunk = args.context, args.scored, 16
    ids = read_tokens(tok, args.text, n + m + 1)
    with torch.no_grad(), _sphkv_attention(model):
        for observation in args.observations:
            shared = SphkvCache(model.config, None, observation=observation)
            model(ids[None, :n], past_key_values=shared, use_cache=True)
            for budget in args.budgets:
                start = time.perf_counter()
                try:
                    cache = shared.compress(get_method(args.method),
                                            budget_bytes(model, budget, n + m))
                except InfeasibleBudgetError as exc:
                    print(f"budget={budget:.4f} skipped: {exc}", flush=True)
                    continue
                nll = 0.0
                for a in range(n, n + m, chunk):
                    b = min(a + chunk, n + m)
                    logits = model(ids[None, a:b], past_key_values=cache,
                                   use_cache=True).logits[0]
                    logp = torch.log_softmax(logits.double(), dim=-1)
                    nll -= float(logp.gather(-1, ids[a + 1:b + 1, None]).sum())
                print(f"{args.method} observation={observation:5d} budget={budget:.4f} "
                      f"ppl={math.exp(nll / m):.3f} peak/fp16="
                      f"{cache.peak_bytes / cache.fp16_bytes():.4f} "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
