"""Bodies of the model-free commands: ``sphkv plot bits`` (the distortion figures and tables),
the RDR-against-baselines sweep of ``sphkv plot rd`` and ``sphkv demo``, and the synthetic
demo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from sphkv.analysis.distortion import (
    attention_error,
    describe,
    key_codecs,
    label,
    logit_errors,
    pair_codecs,
)
from sphkv.analysis.plots import plot_attention_error, plot_logit_distortion

__all__ = ["bits", "demo_sweep", "ladder_sweep", "print_comparison", "print_demo",
           "run_synthetic_demo"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "∞" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def _markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def bits(out_dir: Path, d: int = 64, keys: int = 4096, queries: int = 256, real: bool = True,
         tokens: int = 1024, window: int = 64, seed: int = 0, threads: int = 0,
         text: Path = Path("../shared/data/austen/emma.txt.gz")) -> None:
    """Logit distortion vs bits per coordinate for every key codec (analytic bound, analytic
    RMS prediction, measured max/mean/RMS on random and real keys) and attention-output error vs
    bits per coordinate for key/value codec pairs on real K/V. Writes logit_distortion.png,
    attention_error.png, bits.json and bits.md into ``out_dir``."""
    from sphkv.cli import fail, progress
    from sphkv.rdr.tiers import ada_tiers, default_tiers

    if threads:
        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    rand_k = torch.randn(keys, d, generator=gen)
    rand_q = torch.randn(queries, d, generator=gen)
    codecs = key_codecs(d)
    trace = None
    with progress() as bar:
        if real:
            from sphkv.integrations.hf import capture_trace, load_model, read_tokens

            task = bar.add_task("loading SmolLM2 and prefilling", total=None)
            model, tok = load_model("smollm2")
            # every query kept: the real-key rows read the last `window` of them
            trace = capture_trace(model, read_tokens(tok, text, tokens), window=tokens)
            del model
            bar.update(task, total=1, completed=1)
            if trace.keys.shape[-1] != d:
                fail(f"--d {d} differs from the model's head dim {trace.keys.shape[-1]}")
            # per kv-head: its group's queries of the last `window` positions
            real_q = trace.queries[:, :, -window:].reshape(
                trace.keys.shape[0], trace.keys.shape[1], -1, d)
        rows = []
        task = bar.add_task("key codecs", total=len(codecs))
        for family, codec in codecs:
            row = {"family": family, **describe(codec)}
            stats = logit_errors(codec, rand_k, rand_q)
            row.update(random_max=stats.max, random_mean=stats.mean, random_rms=stats.rms)
            if trace is not None:
                stats = logit_errors(codec, trace.keys, real_q)
                row.update(real_max=stats.max, real_mean=stats.mean, real_rms=stats.rms)
            rows.append(row)
            bar.advance(task)
        plot_logit_distortion(rows, out_dir / "logit_distortion.png", d)
        pairs, ladder = [], []
        if trace is not None:
            tiers = [(t.name, t.key, t.value) for t in default_tiers(d) if not t.is_drop]
            tiers += [(t.name, t.key, t.value) for t in ada_tiers(d).tiers[1:4]]
            todo = pair_codecs(d)
            task = bar.add_task("attention error", total=len(todo) + len(tiers))

            def measure(kc, vc) -> dict:
                err = sum(attention_error(kc, vc, trace.keys[layer], trace.values[layer],
                                          trace.queries[layer, :, -window:])
                          for layer in range(trace.keys.shape[0])) / trace.keys.shape[0]
                return {"key": label(kc), "value": label(vc),
                        "bytes": kc.bytes_per_vector + vc.bytes_per_vector,
                        "bits_per_coord": (kc.bits_per_coordinate + vc.bits_per_coordinate) / 2,
                        "attention_error": err}

            for family, kc, vc in todo:
                pairs.append({"family": family, **measure(kc, vc)})
                bar.advance(task)
            for name, kc, vc in tiers:
                ladder.append({"name": name, **measure(kc, vc)})
                bar.advance(task)
            plot_attention_error(pairs, out_dir / "attention_error.png", ladder)
    (out_dir / "bits.json").write_text(json.dumps(
        {"d": d, "keys": keys, "queries": queries, "tokens": tokens if real else None,
         "window": window, "seed": seed, "key_codecs": rows, "pairs": pairs, "ladder": ladder},
        indent=1))
    cols = ["family", "codec", "bits_per_coord", "bound", "predicted_rms", "random_max",
            "random_mean", "random_rms"]
    if trace is not None:
        cols += ["real_max", "real_mean", "real_rms"]
    text = "## Logit distortion per key codec\n\n" + _markdown(rows, cols) + "\n"
    if pairs:
        cols = ["family", "key", "value", "bytes", "bits_per_coord", "attention_error"]
        text += "\n## Attention-output error per (key, value) codec pair\n\n"
        text += _markdown(pairs, cols) + "\n\n## Default tier ladder (and ADA-key tiers)\n\n"
        text += _markdown(ladder, ["name", "key", "value", "bytes", "bits_per_coord",
                                   "attention_error"]) + "\n"
    (out_dir / "bits.md").write_text(text)
    print(f"wrote {out_dir}/logit_distortion.png, attention_error.png, bits.json, bits.md")


def _restrict(problem, keep: list[int]):
    """The same items with only the tiers ``keep`` (forced tiers must be among them)."""
    from sphkv.rdr import AllocationProblem

    index = {t: j for j, t in enumerate(keep)}
    forced = np.array([index[t] if t >= 0 else -1 for t in problem.forced])
    return AllocationProblem(
        distortion=problem.distortion[:, keep], cost=problem.cost[..., keep],
        budget=problem.budget, groups=problem.groups, page_size=problem.page_size,
        page_overhead=problem.page_overhead, forced=forced,
        tier_names=[problem.tier_names[t] for t in keep])


def ladder_sweep(base, solvers, fractions, ilp_time_limit: float, bar) -> list[dict]:
    """Summary rows at each budget fraction: every solver in ``solvers`` over the full tier
    ladder, and greedy over the drop-only (drop or fp16) and quantize-only (no drop) ladders.

    ``bar`` is a rich Progress; a budget below a ladder's cheapest assignment is skipped with
    a line on its console. A restricted ladder's row has ``lower_bound`` 0 (its bound is not
    one of the full problem).
    """
    from sphkv.rdr import InfeasibleBudgetError
    from sphkv.solvers import solve

    t = base.n_tiers
    ladders = {"drop-only": [0, t - 1], "quantize-only": list(range(1, t))}
    runs = [(m, None) for m in solvers] + list(ladders.items())
    task = bar.add_task("rate-distortion", total=len(fractions) * len(runs))
    rows = []
    for fraction in fractions:
        label = f"1/{round(1 / fraction)}"
        for method, keep in runs:
            bar.update(task, description=f"budget {label}: {method}")
            try:
                problem = base.with_budget(fraction * base.full_cost())
                if keep is not None:
                    problem = _restrict(problem, keep)
            except InfeasibleBudgetError as exc:
                bar.console.print(f"[yellow]{method} at {label}: skipped,[/yellow] "
                                  f"{budget_text(exc)}")
                bar.advance(task)
                continue
            alloc = solve(problem, "greedy" if keep else method,
                          time_limit=ilp_time_limit if method == "ilp" else None)
            row = alloc.summary() | {"method": method, "budget_fraction": fraction}
            if keep is not None:
                row["lower_bound"] = 0.0
            rows.append(row)
            bar.advance(task)
    return rows


def budget_text(exc) -> str:
    """An infeasible budget in whole bytes."""
    return (f"the budget {exc.budget:,.0f} bytes is below the cheapest assignment, "
            f"{exc.min_cost:,.0f} bytes")


def demo_sweep(base, err: Console) -> list[dict]:
    """RDR (greedy, the online allocator's solver, with its proven bound) against the two
    baseline ladders at the demo's budgets."""
    from sphkv.analysis.rd import BUDGET_FRACTIONS
    from sphkv.cli import progress

    with progress(err) as bar:
        return ladder_sweep(base, ("greedy",), BUDGET_FRACTIONS, 0.0, bar)


def run_synthetic_demo(out_dir: Path, tokens: int = 640, layers: int = 30, seed: int = 0,
                       console: Console | None = None) -> dict:
    """The comparison of :func:`run_demo` on a synthetic SmolLM2-shaped problem (no model);
    writes ``demo.json`` and ``rate_distortion.png`` to ``out_dir``."""
    from sphkv.analysis.plots import plot_rdr_vs_baselines
    from sphkv.rdr import synthetic_problem

    err = console or Console(stderr=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = synthetic_problem(layers=layers, tokens=tokens, recent=8, seed=seed)
    rows = demo_sweep(base, err)
    title = f"synthetic SmolLM2-shaped cache: {base.n_items:,} items, pages of 16"
    png = plot_rdr_vs_baselines(rows, out_dir / "rate_distortion.png", title)
    summary = out_dir / "demo.json"
    summary.write_text(json.dumps(
        {"problem": {"items": base.n_items, "tiers": base.tier_names, "page_size": base.page_size,
                     "page_overhead": base.page_overhead, "seed": seed}, "rows": rows},
        indent=2))
    return {"rows": rows, "items": base.n_items, "title": title, "files": [png, summary]}


def print_comparison(rows: list[dict], title: str, out: Console) -> None:
    """The demo's comparison as a table: distortion per budget of RDR, how far from optimal it
    is at most, the two baselines, and how many times RDR's distortion the better baseline
    has."""
    from sphkv.cli import table

    by = {(r["method"], r["budget_fraction"]): r for r in rows}
    columns = ["budget", "bytes", "RDR", "RDR above optimum, at most", "drop-only",
               "quantize-only", "best baseline / RDR"]
    view = table(f"{title}: total expected distortion at equal bytes", columns)
    for f in sorted({r["budget_fraction"] for r in rows}):
        rdr = by.get(("greedy", f))

        def cell(method, f=f):
            row = by.get((method, f))
            if row is None:
                return "infeasible"
            d = row["distortion"]
            return f"{d:,.0f}" if d >= 1000 else f"{d:.4g}"

        gap = f"{rdr['gap']:.2%}" if rdr else ""
        base = [by[m, f]["distortion"] for m in ("drop-only", "quantize-only") if (m, f) in by]
        ratio = (f"{min(base) / rdr['distortion']:.2f}×" if rdr and base
                 and rdr["distortion"] > 0 else "")
        view.add_row(f"{100 * f:g}%", f"{rdr['budget']:,.0f}" if rdr else "", cell("greedy"),
                     gap, cell("drop-only"), cell("quantize-only"), ratio)
    out.print(view)


def print_demo(result: dict, out: Console) -> None:
    """The rest of the demo's results: the two generations, if any, and the files written."""
    gen = result.get("generation")
    if gen:
        out.print(f"\nprompt (last words): …{gen['prompt_tail']}", highlight=False)
        out.print(f"\n[bold]fp16 cache[/bold] ({gen['fp16_bytes']:,} bytes):\n"
                  f"{gen['text_fp16']}", highlight=False)
        out.print(f"\n[bold]RDR cache[/bold] at {gen['budget_fraction']:.0%} of the fp16 bytes "
                  f"(peak {gen['cache_bytes_peak']:,} bytes, "
                  f"{gen['cache_bytes_peak'] / gen['fp16_bytes']:.1%} of fp16):\n{gen['text']}",
                  highlight=False)
    out.print("\nwrote " + ", ".join(str(p) for p in result["files"]), highlight=False)
