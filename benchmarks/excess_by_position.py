"""Where in the continuation a method loses: its excess negative log-likelihood over ``none``
per scored token, averaged in blocks of scored positions.

Reads the JSON an ``eval_sweep`` run writes (its ``ppl`` rows keep each scored token's
``token_nll``), pairs every cell of ``--method`` with the ``none`` cell of the same text, span
and context, token by token, and prints per context the mean excess in each block of
``--block`` positions (position 0 is the first token scored after the context). An allocation
decided once from the prompt's queries shows as a small excess in the first block and a larger
one after it.

    python -m benchmarks.excess_by_position benchmarks/results/eval_runs/levers_spans4.json \\
        --method rdr-kv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def excess_by_block(rows: list[dict], method: str, block: int = 32,
                    budget: float | None = None) -> dict[int, np.ndarray]:
    """Per context: the mean over the paired cells of ``method``'s ``token_nll`` minus
    ``none``'s, in blocks of ``block`` scored positions (the last block may be shorter).

    Raises
    ------
    ValueError
        ``method`` has no perplexity cell with a ``none`` cell beside it.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1 positions, got {block}")
    ppl = [r for r in rows if r.get("task", "ppl") == "ppl" and r.get("token_nll")]
    none = {(r["text"], r["context"], r["span"]): np.asarray(r["token_nll"])
            for r in ppl if r["method"] == "none"}
    paired: dict[int, list[np.ndarray]] = {}
    for r in ppl:
        key = (r["text"], r["context"], r["span"])
        if r["method"] != method or key not in none:
            continue
        if budget is not None and not np.isclose(r["budget"], budget):
            continue
        paired.setdefault(r["context"], []).append(np.asarray(r["token_nll"]) - none[key])
    if not paired:
        raise ValueError(f"no perplexity cell of method {method!r} has a 'none' cell on the "
                         f"same text, span and context (with token_nll)")
    out = {}
    for context, cells in sorted(paired.items()):
        excess = np.mean(cells, axis=0)
        out[context] = np.array([excess[i:i + block].mean()
                                 for i in range(0, len(excess), block)])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+",
                        help="eval_sweep JSON files (read together: none may be in another)")
    parser.add_argument("--method", required=True, help="the method compared with none")
    parser.add_argument("--budget", type=float, help="only this budget (fraction of fp16)")
    parser.add_argument("--block", type=int, default=32, help="scored positions per block")
    args = parser.parse_args(argv)
    rows = [r for path in args.results for r in json.loads(path.read_text())["rows"]]
    try:
        blocks = excess_by_block(rows, args.method, args.block, args.budget)
    except ValueError as exc:
        parser.error(str(exc))
    for context, excess in blocks.items():
        print(f"context {context}: excess nll per token, blocks of {args.block} positions: "
              + " ".join(f"{x:.4f}" for x in excess))


if __name__ == "__main__":
    main()
