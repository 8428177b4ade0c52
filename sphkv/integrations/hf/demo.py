"""The main job: the whole pipeline on SmolLM2 and a text shipped in the package.

Capture a KV trace (kept, to solve again), solve its allocation problem at several budgets with
RDR over the whole tier ladder against drop-only and quantize-only ladders at the same bytes,
draw the comparison, then generate with the model's own cache and through the compressed cache
and report both texts and the memory.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from rich.console import Console

__all__ = ["DEMO_SOLVERS", "DEMO_TEXT", "print_demo", "run_demo", "run_synthetic_demo"]

DEMO_TEXT = "pride_and_prejudice_opening.txt"
#: RDR's solvers in the demo: greedy (the online allocator's) and the exact ilp as its check
DEMO_SOLVERS = ("greedy", "ilp")


def _sweep(base, ilp_time_limit: float, err: Console) -> list[dict]:
    from sphkv.analysis.rd import BUDGET_FRACTIONS
    from sphkv.cli import progress
    from sphkv.integrations.hf.cli import ladder_sweep

    with progress(err) as bar:
        return ladder_sweep(base, DEMO_SOLVERS, BUDGET_FRACTIONS, ilp_time_limit, bar)


def run_demo(out_dir: Path, model_name: str = "smollm2", tokens: int = 640, window: int = 32,
             recent: int = 16, new_tokens: int = 32, generation_budget: float = 0.25,
             ilp_time_limit: float = 10.0, console: Console | None = None) -> dict:
    """Run the pipeline; write ``trace.safetensors``, ``demo.json`` and
    ``rate_distortion.png`` to ``out_dir``.

    Returns the rows of the comparison, the generation's summary (with the fp16 cache's text
    beside the compressed one) and the paths written.
    """
    import torch

    from sphkv.analysis.plots import plot_rdr_vs_baselines
    from sphkv.cli import load_model_or_fail, progress
    from sphkv.integrations.hf.generate import compressed_generate, fp16_cache_bytes
    from sphkv.integrations.hf.text import read_tokens
    from sphkv.integrations.hf.trace import capture_trace, save_trace
    from sphkv.rdr import default_tiers
    from sphkv.rdr.distortion import problem_from_trace

    err = console or Console(stderr=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model_or_fail(model_name)
    with resources.as_file(resources.files("sphkv") / "data" / DEMO_TEXT) as path:
        ids = read_tokens(tokenizer, path, tokens)
    with progress(err) as bar:
        trace = capture_trace(model, ids, window=window, model_name=model_name,
                              source=DEMO_TEXT, progress=bar)
    trace_path = save_trace(trace, out_dir / "trace.safetensors")
    with progress(err, transient=True) as bar:
        bar.add_task(f"measuring the distortion of {trace.layers * trace.kv_heads * tokens:,} "
                     "items at six tiers with the real codecs", total=None)
        base = problem_from_trace(trace, default_tiers(trace.head_dim), 1.0, recent=recent)
    rows = _sweep(base, ilp_time_limit, err)
    with progress(err, transient=True) as bar:
        task = bar.add_task(f"generating {new_tokens} tokens with the fp16 cache", total=2)
        with torch.no_grad():
            reference = model.generate(ids[None], max_new_tokens=new_tokens, do_sample=False)
        bar.update(task, completed=1, description=f"generating {new_tokens} tokens through "
                                                  f"the compressed cache")
        sequences, cache = compressed_generate(model, ids[None], fraction=generation_budget,
                                               max_new_tokens=new_tokens)
        bar.update(task, completed=2)
    generation = {"budget_fraction": generation_budget, "budget_bytes": cache.budget,
                  "cache_bytes_peak": cache.peak_bytes,
                  "fp16_bytes": fp16_cache_bytes(model.config, 1, sequences.shape[1]),
                  "prompt_tokens": int(ids.shape[0]), "new_tokens": new_tokens,
                  "prompt_tail": tokenizer.decode(ids[-24:], skip_special_tokens=True),
                  "text": tokenizer.decode(sequences[0, ids.shape[0]:],
                                           skip_special_tokens=True),
                  "text_fp16": tokenizer.decode(reference[0, ids.shape[0]:],
                                                skip_special_tokens=True)}
    title = f"{model_name}, {tokens} tokens of Pride and Prejudice: {base.n_items:,} items"
    png = plot_rdr_vs_baselines(rows, out_dir / "rate_distortion.png", title)
    summary = out_dir / "demo.json"
    summary.write_text(json.dumps(
        {"model": model_name, "text": DEMO_TEXT, "tokens": tokens, "window": window,
         "recent": recent, "tiers": base.tier_names, "rows": rows, "generation": generation},
        indent=2))
    return {"rows": rows, "generation": generation, "items": base.n_items, "title": title,
            "files": [trace_path, png, summary]}


def run_synthetic_demo(out_dir: Path, tokens: int = 640, layers: int = 30, seed: int = 0,
                       ilp_time_limit: float = 10.0, console: Console | None = None) -> dict:
    """The comparison of :func:`run_demo` on a synthetic SmolLM2-shaped problem (no model);
    writes ``demo.json`` and ``rate_distortion.png`` to ``out_dir``."""
    from sphkv.analysis.plots import plot_rdr_vs_baselines
    from sphkv.rdr import synthetic_problem

    err = console or Console(stderr=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = synthetic_problem(layers=layers, tokens=tokens, recent=8, seed=seed)
    rows = _sweep(base, ilp_time_limit, err)
    title = f"synthetic SmolLM2-shaped cache: {base.n_items:,} items, pages of 16"
    png = plot_rdr_vs_baselines(rows, out_dir / "rate_distortion.png", title)
    summary = out_dir / "demo.json"
    summary.write_text(json.dumps(
        {"problem": {"items": base.n_items, "tiers": base.tier_names, "page_size": base.page_size,
                     "page_overhead": base.page_overhead, "seed": seed}, "rows": rows},
        indent=2))
    return {"rows": rows, "items": base.n_items, "title": title, "files": [png, summary]}


def print_demo(result: dict, out: Console) -> None:
    """The comparison as a table (distortion per budget: RDR, its exact optimum, the two
    baselines, and how many times RDR's distortion the better baseline has), then the two
    generations and the files written."""
    from sphkv.cli import table

    rows = result["rows"]
    by = {(r["method"], r["budget_fraction"]): r for r in rows}
    columns = ["budget", "bytes", "RDR (greedy)", "RDR exact (ilp)", "drop-only",
               "quantize-only", "best baseline / RDR"]
    view = table(f"{result['title']}: total expected distortion at equal bytes", columns)
    for f in sorted({r["budget_fraction"] for r in rows}):
        rdr = by.get(("greedy", f))

        def cell(method, f=f):
            row = by.get((method, f))
            return "infeasible" if row is None else f"{row['distortion']:.4g}"

        ilp = by.get(("ilp", f))
        exact = cell("ilp") + ("" if ilp is None or ilp["status"] == "optimal"
                               else f" ({ilp['status']})")
        base = [by[m, f]["distortion"] for m in ("drop-only", "quantize-only") if (m, f) in by]
        ratio = (f"{min(base) / rdr['distortion']:.2f}×" if rdr and base
                 and rdr["distortion"] > 0 else "")
        view.add_row(f"{100 * f:g}%", f"{rdr['budget']:,.0f}" if rdr else "", cell("greedy"),
                     exact, cell("drop-only"), cell("quantize-only"), ratio)
    out.print(view)
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
