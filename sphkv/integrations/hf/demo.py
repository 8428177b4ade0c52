"""The main job: the whole pipeline on SmolLM2 and a text shipped in the package.

Capture a KV trace, solve its allocation problem with every solver at several budgets, draw the
rate-distortion curves, then generate through the compressed cache and report its memory
against fp16.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from sphkv.analysis.rd import BUDGET_FRACTIONS, plot_rate_distortion, solver_sweep
from sphkv.integrations.hf.generate import compressed_generate, fp16_cache_bytes
from sphkv.integrations.hf.model import SMOLLM2, load_model
from sphkv.integrations.hf.text import read_tokens
from sphkv.integrations.hf.trace import capture_trace
from sphkv.rdr import default_tiers
from sphkv.rdr.distortion import problem_from_trace
from sphkv.solvers import SOLVERS

__all__ = ["DEMO_TEXT", "run_demo"]

DEMO_TEXT = "pride_and_prejudice_opening.txt"


def run_demo(out_dir: Path, model_name: str = SMOLLM2, tokens: int = 640, window: int = 32,
             recent: int = 16, new_tokens: int = 32, generation_budget: float = 0.25,
             ilp_time_limit: float = 10.0, console: Console | None = None) -> dict:
    """Run the pipeline and write ``demo.json`` and ``rate_distortion.png`` to ``out_dir``.

    Returns the rows of the solver comparison and the generation's summary.
    """
    err = console or Console(stderr=True)
    text = resources.files("sphkv") / "data" / DEMO_TEXT
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task(f"loading {model_name}", total=None)
        model, tokenizer = load_model(model_name)
        with resources.as_file(text) as path:
            ids = read_tokens(tokenizer, path, tokens)
        progress.update(task, description=f"capturing a {tokens}-token trace")
        trace = capture_trace(model, ids, window=window, model_name=model_name,
                              source=DEMO_TEXT)
        tiers = default_tiers(trace.head_dim)
        progress.update(task, description="measuring distortion with the real codecs")
        base = problem_from_trace(trace, tiers, 1.0, recent=recent)
        progress.update(task, total=len(BUDGET_FRACTIONS) * len(SOLVERS), completed=0)

        def step(label: str) -> None:
            progress.update(task, description=label, advance=1)

        def skip(fraction: float, exc: Exception) -> None:
            err.print(f"[yellow]skipping budget 1/{round(1 / fraction)}:[/yellow] {exc}")
            progress.advance(task, len(SOLVERS))

        rows = solver_sweep(base, ilp_time_limit=ilp_time_limit, on_step=step, on_skip=skip)
        progress.update(task, description=f"generating {new_tokens} tokens through the "
                                          f"compressed cache", total=None)
        sequences, cache = compressed_generate(model, ids[None], generation_budget,
                                               max_new_tokens=new_tokens)
    continuation = tokenizer.decode(sequences[0, ids.shape[0]:], skip_special_tokens=True)
    fp16 = fp16_cache_bytes(model.config, 1, sequences.shape[1])
    generation = {"budget_fraction": generation_budget, "budget_bytes": cache.budget,
                  "cache_bytes_peak": cache.peak_bytes, "fp16_bytes": fp16,
                  "prompt_tokens": int(ids.shape[0]), "new_tokens": new_tokens,
                  "text": continuation}
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{model_name}, {tokens} tokens of Pride and Prejudice: {base.n_items:,} items"
    png = plot_rate_distortion(rows, out_dir / "rate_distortion.png", title)
    (out_dir / "demo.json").write_text(json.dumps(
        {"model": model_name, "text": DEMO_TEXT, "tokens": tokens, "window": window,
         "tiers": base.tier_names, "rows": rows, "generation": generation}, indent=2))
    err.print(f"wrote {png} and {out_dir / 'demo.json'}")
    return {"rows": rows, "generation": generation, "items": base.n_items}
