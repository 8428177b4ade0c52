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

__all__ = ["DEMO_TEXT", "run_demo"]

DEMO_TEXT = "pride_and_prejudice_opening.txt"


def run_demo(out_dir: Path, model_name: str = "smollm2", tokens: int = 640, window: int = 32,
             recent: int = 16, new_tokens: int = 32, generation_budget: float = 0.25,
             console: Console | None = None, out: Console | None = None) -> dict:
    """Run the pipeline; write ``trace.safetensors``, ``demo.json`` and
    ``rate_distortion.png`` to ``out_dir``.

    Returns the rows of the comparison, the generation's summary (with the fp16 cache's text
    beside the compressed one) and the paths written. With ``out``, the comparison is printed
    there as soon as it is solved, before the generations.
    """
    import torch

    from sphkv.analysis.plots import plot_rdr_vs_baselines
    from sphkv.cli import load_model_or_fail, progress
    from sphkv.cli.analysis import demo_sweep, print_comparison
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
        task = bar.add_task(f"measuring the distortion of "
                            f"{trace.layers * trace.kv_heads * tokens:,} items at six tiers with "
                            f"the real codecs, layer by layer", total=trace.layers)
        base = problem_from_trace(trace, default_tiers(trace.head_dim), 1.0, recent=recent,
                                  on_layer=lambda done: bar.update(task, completed=done))
    rows = demo_sweep(base, err)
    title = f"{model_name}, {tokens} tokens of Pride and Prejudice: {base.n_items:,} items"
    if out is not None:
        print_comparison(rows, title, out)
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
    png = plot_rdr_vs_baselines(rows, out_dir / "rate_distortion.png", title)
    summary = out_dir / "demo.json"
    summary.write_text(json.dumps(
        {"model": model_name, "text": DEMO_TEXT, "tokens": tokens, "window": window,
         "recent": recent, "tiers": base.tier_names, "rows": rows, "generation": generation},
        indent=2))
    return {"rows": rows, "generation": generation, "items": base.n_items, "title": title,
            "files": [trace_path, png, summary]}
