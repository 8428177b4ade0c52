"""``sphkv capture``: prefill a model on a text and write its KV trace."""

from __future__ import annotations

from pathlib import Path

__all__ = ["byte_share_report", "capture_to_file", "rd", "trace_problem"]


def capture_to_file(text: Path, out: Path, model: str = "smollm2", tokens: int = 1024,
                    window: int = 64) -> None:
    """The body of ``sphkv capture`` (arguments checked by :mod:`sphkv.cli`): prefill ``tokens``
    tokens of ``text`` and store post-RoPE keys, values and the last ``window`` queries of
    every layer, with metadata, in a .safetensors trace at ``out``."""
    from sphkv.cli import err, fail, load_model_or_fail, progress
    from sphkv.integrations.hf.text import read_tokens
    from sphkv.integrations.hf.trace import capture_trace, save_trace

    lm, tok = load_model_or_fail(model)
    try:
        ids = read_tokens(tok, text, tokens)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        fail(f"{exc}", exc)
    with progress() as bar:
        trace = capture_trace(lm, ids, window, model_name=model, source=text.name,
                              progress=bar)
    save_trace(trace, out)
    size = out.stat().st_size
    err.print(f"wrote {out}: {trace.layers} layers × {trace.kv_heads} kv-heads "
              f"({trace.q_heads} query heads) × {trace.tokens:,} tokens × d={trace.head_dim}, "
              f"window {trace.window}, {trace.dtype}, {size / 2**20:.1f} MiB")


def trace_problem(path: Path, budget: str | None, estimator: str | None):
    """The allocation problem of a trace file at a CLI budget string (default 1/8 of fp16).

    Returns ``(problem, trace)``; tiers are ``default_tiers(head_dim)``, pages of 16 tokens,
    4 sinks and the trace's window forced to fp16 (see :func:`sphkv.rdr.problem_from_trace`).
    """
    from sphkv.cli import parse_budget, progress
    from sphkv.integrations.hf.trace import load_trace
    from sphkv.rdr import default_tiers, problem_from_trace

    trace = load_trace(path)
    with progress(transient=True) as bar:
        full = problem_from_trace(trace, default_tiers(trace.head_dim), 1.0, estimator=estimator,
                                  on_layer=_layer_bar(bar, trace))
    return full.with_budget(parse_budget(budget or "0.125", full.full_cost())), trace


def _items(trace) -> int:
    return trace.layers * trace.kv_heads * trace.tokens


def _layer_bar(bar, trace):
    """A progress task over the trace's layers; the hook that advances it."""
    task = bar.add_task(f"measuring the distortion of {_items(trace):,} items at every tier, "
                        f"layer by layer", total=trace.layers)
    return lambda done: bar.update(task, completed=done)


def byte_share_report(problem, tiers, trace):
    """Bytes an allocation gives each layer and kv-head, as JSON-ready shares and a table."""
    from sphkv.rdr import byte_shares

    per_head = byte_shares(problem, tiers, trace.layers, trace.kv_heads)  # [L, H_kv]
    total = max(per_head.sum(), 1.0)
    report = {"bytes_per_layer": per_head.sum(axis=1).tolist(),
              "per_layer": (per_head.sum(axis=1) / total).tolist(),
              "per_head": (per_head / total).tolist()}
    from sphkv.cli import table as new_table

    table = new_table("byte shares (pages included) per layer and kv-head",
                      ["layer", "bytes", "share", *(f"head {h}" for h in range(trace.kv_heads))])
    for layer, row in enumerate(per_head):
        table.add_row(str(layer), f"{row.sum():,.0f}", f"{row.sum() / total:.1%}",
                      *(f"{b / total:.1%}" for b in row))
    return report, table


def rd(trace_file: Path, out: Path = Path("rd.png"), estimator: str | None = None,
       ilp_time_limit: float = 10.0) -> None:
    """The body of ``sphkv plot rd``: distortion vs budget (1/16 … 1/2 of fp16) on a trace:
    greedy, lp and ilp over the full tier ladder, and greedy over drop-only (drop or fp16) and
    quantize-only (no drop) ladders."""
    import json

    from sphkv.analysis.plots import plot_rdr_vs_baselines
    from sphkv.analysis.rd import BUDGET_FRACTIONS
    from sphkv.cli import err, fail, progress
    from sphkv.cli.analysis import ladder_sweep
    from sphkv.integrations.hf.trace import load_trace
    from sphkv.rdr import default_tiers, problem_from_trace
    from sphkv.solvers import SOLVERS

    try:
        trace = load_trace(trace_file)
        with progress(transient=True) as bar:
            base = problem_from_trace(trace, default_tiers(trace.head_dim), 1.0,
                                      estimator=estimator, on_layer=_layer_bar(bar, trace))
    except ValueError as exc:
        fail(str(exc), exc)
    with progress() as bar:
        rows = ladder_sweep(base, SOLVERS, BUDGET_FRACTIONS, ilp_time_limit, bar)
    if not rows:
        fail("no budget from 1/16 to 1/2 is feasible for this trace")
    title = (f"{trace.model or 'trace'}: {trace.layers}×{trace.kv_heads}×{trace.tokens:,} "
             f"items, pages of {base.page_size}")
    png = plot_rdr_vs_baselines(rows, out, title)
    out.with_suffix(".json").write_text(json.dumps(
        {"trace": str(trace_file), "estimator": estimator, "tiers": base.tier_names,
         "rows": rows}, indent=1))
    err.print(f"wrote {png} and {out.with_suffix('.json')}")
