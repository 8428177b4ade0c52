"""Quality sweep: methods × budgets × tasks through the compressed cache (DESIGN.md §5).

``python -m benchmarks.eval_sweep --quick`` runs a few cells at small N; without ``--quick`` the
full grid. Writes ``eval_quick.{md,json}`` (or ``eval.{md,json}``) to ``--out-dir`` with date,
commit, device, model, text and trial counts in the header. The registry of methods, budgets
and tasks lives here, not in the library.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, environment, format_table

#: every method of the comparison; ``none`` is the uncompressed baseline
METHODS = ("none", "rdr", "rdr-ada", "streamingllm", "snapkv", "keydiff", "kivi", "turboquant")
#: fractions of the fp16 cache
BUDGETS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
#: full grid: perplexity at N ∈ {1k, 2k, 4k} scoring M = 256; pass key at N = 2k, depths
#: 10 %…90 % over the trials, both settings
FULL = {"ppl": {"contexts": (1024, 2048, 4096), "scored": 256},
        "passkey": {"contexts": (2048,), "trials": 8,
                    "settings": ("query-agnostic", "query-aware")}}
#: quick: a few cells at small N (CI)
QUICK = {"methods": ("none", "rdr", "snapkv", "kivi"), "budgets": (1 / 8,),
         "ppl": {"contexts": (512,), "scored": 64},
         "passkey": {"contexts": (512,), "trials": 3, "settings": ("query-agnostic",)}}


def cells(quick: bool) -> list[dict]:
    """The (task, method, budget, context, setting) cells; ``none`` runs once per context."""
    grid = QUICK if quick else FULL
    methods = QUICK["methods"] if quick else METHODS
    budgets = QUICK["budgets"] if quick else BUDGETS
    out = []
    for task in ("ppl", "passkey"):
        spec = grid[task]
        for n in spec["contexts"]:
            for setting in spec.get("settings", (None,)):
                for method in methods:
                    for budget in (1.0,) if method == "none" else budgets:
                        out.append({"task": task, "method": method, "budget": budget,
                                    "context": n, "setting": setting})
    return out


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Run every cell; rows for the table and the header's settings."""
    import torch

    from sphkv.integrations.hf import load_model, read_tokens
    from sphkv.integrations.hf.tasks import passkey, perplexity

    grid = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    todo = cells(args.quick)
    longest = max(c["context"] for c in todo) + grid["ppl"]["scored"] + 1
    ids = read_tokens(tok, args.text, longest)
    rows = []
    for i, c in enumerate(todo):
        start = time.perf_counter()
        if c["task"] == "ppl":
            r = perplexity(model, ids, c["context"], grid["ppl"]["scored"], c["budget"],
                           c["method"], chunk=args.chunk)
            quality = {"ppl": r.ppl, "nll": r.nll, "trials": None, "accuracy": None}
        else:
            r = passkey(model, tok, ids[:c["context"]], c["budget"], c["method"], c["setting"],
                        trials=grid["passkey"]["trials"])
            quality = {"ppl": None, "nll": None, "trials": r.n_trials, "accuracy": r.accuracy}
        rows.append({**c, **quality, "bytes_vs_fp16": r.cache_bytes_peak / r.fp16_bytes,
                     "seconds": time.perf_counter() - start})
        print(f"[{i + 1}/{len(todo)}] {c['task']} {c['method']} {c['budget']:.4g} "
              f"N={c['context']} {c['setting'] or ''}: "
              f"{quality['ppl'] if c['task'] == 'ppl' else quality['accuracy']:.4g} "
              f"({rows[-1]['seconds']:.1f} s)", flush=True)
    header = {"model": args.model, "text": Path(args.text).name, "quick": args.quick,
              "ppl_scored": grid["ppl"]["scored"], "ppl_chunk": args.chunk,
              "passkey_trials": grid["passkey"]["trials"], "threads": args.threads}
    return rows, header


def write(rows: list[dict], header: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    """``name.json`` (header and rows) and ``name.md`` (header lines and the table)."""
    env = environment()
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps({**env, **header, "rows": rows}, indent=2))
    md = out_dir / f"{name}.md"
    lines = [f"# {name} — {env['date']} — commit {env['commit']} — {env['device']}", "",
             f"model {header['model']}, text {header['text']}; perplexity scores "
             f"{header['ppl_scored']} tokens (chunks of {header['ppl_chunk']}); pass key "
             f"{header['passkey_trials']} trials per cell; {header['threads']} threads", "",
             format_table(rows, ["task", "setting", "context", "method", "budget",
                                 "bytes_vs_fp16", "ppl", "accuracy", "trials", "seconds"])]
    md.write_text("\n".join(lines) + "\n")
    return md, js


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few cells at small N")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", type=Path, required=True, help="text file (.gz allowed)")
    parser.add_argument("--chunk", type=int, default=16,
                        help="perplexity: tokens per teacher-forced forward")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    rows, header = run(args)
    md, js = write(rows, header, args.out_dir, "eval_quick" if args.quick else "eval")
    print(md.read_text())
    print(f"wrote {md} and {js}")


if __name__ == "__main__":
    main()
