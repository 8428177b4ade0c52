"""Perplexity or pass key of RDR against the knobs of its distortion and ladder: the number of
prompt queries it observes, the uniform prior mixed into their attention (``floor``), whether
distortion is taken relative to each layer's output energy (``relative``), and a 1-bit rung
below the ladder's cheapest (``--one-bit``).

The sweep's tasks (:func:`~sphkv.integrations.hf.tasks.perplexity_runs`: N tokens prefilled,
the next M scored in chunks of 16; :func:`~sphkv.integrations.hf.tasks.passkey_runs`: N-token
haystacks, trials at depths 10 %…90 %) with one shared prefill per observation count (per
trial for the pass key). Every combination runs at every budget; one line per cell.

    python -m benchmarks.rdr_ablation --text ../shared/data/austen/pride_and_prejudice.txt.gz \\
        --observations 256 --floors 0 0.5 --relative off on --budgets 0.125 0.25
    python -m benchmarks.rdr_ablation --text ../shared/data/austen/pride_and_prejudice.txt.gz \\
        --task passkey --one-bit off on --budgets 0.125
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

import torch

from sphkv.codec import TurboQuantCodec
from sphkv.integrations.hf import load_model, read_tokens
from sphkv.integrations.hf.tasks import SETTINGS, passkey_runs, perplexity_runs
from sphkv.rdr.methods import METHODS
from sphkv.rdr.tiers import Tier, TierSet


def with_one_bit(ladder):
    """``ladder`` with a 1-bit TurboQuant rung (keys and values) after drop."""
    def ladder_one_bit(d: int) -> TierSet:
        full = ladder(d)
        one = Tier("turbo1", TurboQuantCodec(d=d, bits=1), TurboQuantCodec(d=d, bits=1))
        return TierSet((full[0], one, *full[1:]))

    return ladder_one_bit


def variant(base: str, floor: float, relative: bool, one_bit: bool = False) -> str:
    """Register ``base`` with ``floor``, ``relative`` and maybe a 1-bit rung in
    :data:`METHODS`; its name."""
    name = (f"{base}[floor={floor:g},relative={'on' if relative else 'off'}"
            f"{',one-bit' if one_bit else ''}]")
    method = METHODS[base]
    METHODS[name] = dataclasses.replace(
        method, name=name, floor=floor, relative=relative,
        ladder=with_one_bit(method.ladder) if one_bit else method.ladder)
    return name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, required=True, help="text file (.gz allowed)")
    parser.add_argument("--context", type=int, default=1024, help="N, prefilled tokens")
    parser.add_argument("--scored", type=int, default=128, help="M, scored tokens")
    parser.add_argument("--observations", type=int, nargs="+", default=[256],
                        help="prompt queries the prefill allocation reads")
    parser.add_argument("--floors", type=float, nargs="+", default=[0.5],
                        help="weights of the uniform prior, each in [0, 1)")
    parser.add_argument("--relative", nargs="+", choices=["off", "on"], default=["on"],
                        help="distortion relative to each layer's output energy")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.125, 0.25],
                        help="fractions of the fp16 cache")
    parser.add_argument("--one-bit", nargs="+", choices=["off", "on"], default=["off"],
                        help="a 1-bit TurboQuant rung below the ladder's cheapest")
    parser.add_argument("--task", choices=["ppl", "passkey"], default="ppl",
                        help="perplexity (--context, --scored) or pass key (--trials, --settings)")
    parser.add_argument("--trials", type=int, default=5, help="pass key: trials per cell")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                        help="pass key: settings")
    parser.add_argument("--method", default="rdr", choices=["rdr", "rdr-ada", "rdr-scalar"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    ids = read_tokens(tok, args.text, args.context + args.scored + 1)
    runs = [(variant(args.method, f, r == "on", o == "on"), b)
            for f, r, o in itertools.product(args.floors, args.relative, args.one_bit)
            for b in args.budgets]
    if args.task == "passkey":
        for setting in args.settings:
            results = passkey_runs(model, tok, ids[:args.context], runs, setting,
                                   trials=args.trials)
            for (name, budget), r in zip(runs, results, strict=True):
                print(f"{name} {setting} budget={budget:.4f} correct={r.correct}/{r.n_trials} "
                      f"peak/fp16={r.cache_bytes_peak / r.fp16_bytes:.4f} ({r.seconds:.0f} s)",
                      flush=True)
        return
    for observation in args.observations:
        results = perplexity_runs(model, ids, args.context, args.scored, runs,
                                  observation=observation)
        for (name, budget), r in zip(runs, results, strict=True):
            print(f"{name} observation={observation:5d} budget={budget:.4f} ppl={r.ppl:.3f} "
                  f"peak/fp16={r.cache_bytes_peak / r.fp16_bytes:.4f} ({r.seconds:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
