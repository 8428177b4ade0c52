"""Perplexity of RDR against the number of prompt queries its prefill allocation observes.

The sweep's perplexity task (:func:`~sphkv.integrations.hf.tasks.perplexity_runs`: N tokens
prefilled, the next M scored in chunks of 16) with ``observation`` varied; one shared prefill
per observation count. Prints one line per cell.

    python -m benchmarks.rdr_observation --text ../shared/data/austen/pride_and_prejudice.txt.gz \\
        --observations 16 64 256 1024 --budgets 0.125 0.25
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sphkv.integrations.hf import load_model, read_tokens
from sphkv.integrations.hf.methods import METHODS
from sphkv.integrations.hf.tasks import perplexity_runs


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
    ids = read_tokens(tok, args.text, args.context + args.scored + 1)
    runs = [(args.method, b) for b in args.budgets]
    for observation in args.observations:
        results = perplexity_runs(model, ids, args.context, args.scored, runs,
                                  observation=observation)
        for (_, budget), r in zip(runs, results, strict=True):
            print(f"{r.method} observation={observation:5d} budget={budget:.4f} "
                  f"ppl={r.ppl:.3f} peak/fp16={r.cache_bytes_peak / r.fp16_bytes:.4f} "
                  f"({r.seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
