"""The ``sphkv`` command."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from sphkv.analysis.cli import plot_app
from sphkv.integrations.hf.cli import byte_share_report, capture, trace_problem
from sphkv.integrations.hf.eval_cli import evaluate
from sphkv.integrations.hf.generate import generate
from sphkv.rdr import ESTIMATORS, AllocationProblem, InfeasibleBudgetError, synthetic_problem
from sphkv.solvers import SOLVERS
from sphkv.solvers import solve as solve_problem

app = typer.Typer(
    help="sphkv: rate-distortion allocation and compression of the KV cache.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(plot_app, name="plot")
app.command("capture")(capture)
app.command("generate")(generate)
app.command("eval")(evaluate)

# Progress and tables go to stderr, so stdout carries only results (and --json stays clean).
err = Console(stderr=True)

_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


def parse_budget(text: str, full_cost: float) -> float:
    """Bytes from a budget string.

    ``12.5%`` or a plain number in (0, 1] is a fraction of ``full_cost`` (every item at fp16,
    pages included); a number above 1 is bytes, optionally with a unit (``B``, ``KB``, ``MB``,
    ``GB``, ``KiB``, ``MiB``, ``GiB``).
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%|[a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS | {"%": 0}:
        raise typer.BadParameter(f"{text!r}: expected a fraction like 0.125, a percentage like "
                                 "12.5%, or bytes like 3e6 or 2.5MiB", param_hint="--budget")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        return value / 100 * full_cost
    if unit == "" and 0 < value <= 1:
        return value * full_cost
    if value <= 0:
        raise typer.BadParameter(f"{text!r}: the budget must be positive", param_hint="--budget")
    return value * _UNITS[unit]


def _solve_with_spinner(problem: AllocationProblem, method: str, time_limit: float | None,
                        options: dict, quiet: bool):
    """Solve in a worker thread while a spinner with elapsed time runs on stderr."""
    result: dict = {}

    def work():
        try:
            result["alloc"] = solve_problem(problem, method, time_limit=time_limit, **options)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    limit = f" (time limit {time_limit:g} s)" if time_limit else ""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err, transient=True, disable=quiet) as progress:
        progress.add_task(f"solving {problem.n_items:,} items × {problem.n_tiers} tiers "
                          f"with {method}{limit}", total=None)
        thread.start()
        thread.join()
    if "error" in result:
        raise result["error"]
    return result["alloc"]


def _summary_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for col in ("method", "budget", "cost", "distortion", "lower bound", "gap", "status",
                "seconds"):
        table.add_column(col, justify="left" if col in ("method", "status") else "right")
    for r in rows:
        table.add_row(r["method"], f"{r['budget']:,.0f}", f"{r['cost']:,.0f}",
                      f"{r['distortion']:.6g}", f"{r['lower_bound']:.6g}", f"{r['gap']:.3%}",
                      r["status"], f"{r['seconds']:.2f}")
    return table


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: readers
    see the old file or the new one, never a part, and a kill mid-write leaves the old one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@app.command()
def solve(
    problem_file: Annotated[Path, typer.Argument(
        help="A saved AllocationProblem (.npz, see AllocationProblem.load for the layout) or a "
             "KV trace (.safetensors, from `sphkv capture`).",
        exists=True, dir_okay=False, readable=True)],
    budget: Annotated[str | None, typer.Option(
        help="Fraction of the all-fp16 cost (0.125 or 12.5%) or bytes (3e6, 2.5MiB); a number "
             "in (0, 1] is a fraction, above 1 is bytes. Default: the budget in the file.")] = None,
    method: Annotated[str, typer.Option(
        help=f"Solver: {', '.join(SOLVERS)} (see `sphkv solvers`).")] = "greedy",
    time_limit: Annotated[float | None, typer.Option(
        help="Seconds; ilp then returns its best allocation with status time_limit.")] = None,
    backend: Annotated[str | None, typer.Option(
        help="Solver backend: greedy numpy|torch, lp HIGHS|SCIPY|CLARABEL, "
             "ilp highs|scip|cpsat.")] = None,
    out: Annotated[Path | None, typer.Option(
        help="Write the allocation (summary and tier per item) as JSON here.")] = None,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout, nothing else.")] = False,
    estimator: Annotated[str | None, typer.Option(
        help=f"For a trace: utility estimator ({', '.join(ESTIMATORS)}); default: the "
             "measured attention of the trace's observation window.")] = None,
) -> None:
    """Solve an allocation problem: one tier per item, least distortion within the budget.

    A trace (.safetensors) becomes a problem with the default tiers, pages of 16, 4 sinks and
    the observation window at fp16; its default budget is 1/8 of fp16."""
    if method not in SOLVERS:
        raise typer.BadParameter(f"{method!r}: choose one of {', '.join(SOLVERS)}",
                                 param_hint="--method")
    is_trace = problem_file.suffix == ".safetensors"
    if out is not None and not out.parent.is_dir():
        raise typer.BadParameter(f"folder {out.parent} does not exist", param_hint="--out")
    if out is not None and out.is_dir():
        raise typer.BadParameter(f"{out} is a folder, not a file", param_hint="--out")
    if estimator is not None and not is_trace:
        raise typer.BadParameter("only a trace (.safetensors) takes an estimator",
                                 param_hint="--estimator")
    try:
        if is_trace:
            problem, trace = trace_problem(problem_file, budget, estimator, parse_budget)
        else:
            problem = AllocationProblem.load(problem_file)
            if budget is not None:
                problem = problem.with_budget(parse_budget(budget, problem.full_cost()))
        alloc = _solve_with_spinner(problem, method, time_limit,
                                    {} if backend is None else {"backend": backend},
                                    quiet=json_output)
    except (InfeasibleBudgetError, ValueError) as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    summary = alloc.summary() | {"items": problem.n_items, "full_cost": problem.full_cost()}
    names = problem.tier_names or [str(t) for t in range(problem.n_tiers)]
    summary["tier_counts"] = dict(zip(names, np.bincount(alloc.tiers, minlength=len(names))
                                      .tolist()))
    if is_trace:
        summary["byte_shares"], shares_table = byte_share_report(problem, alloc.tiers, trace)
    if out is not None:
        _write_atomically(out, json.dumps(summary | {"tiers": alloc.tiers.tolist()}))
    if json_output:
        print(json.dumps(summary))
        return
    err.print(_summary_table([summary], f"{problem_file.name}: {problem.n_items:,} items"))
    err.print("items per tier: " + ", ".join(f"{k} {v:,}" for k, v in
                                              summary["tier_counts"].items()))
    if is_trace:
        err.print(shares_table)
    if out is not None:
        err.print(f"wrote {out}")


@app.command()
def solvers() -> None:
    """List the solvers in order of preference, with what each can do."""
    table = Table(title="sphkv solvers (first = default)")
    for col in ("name", "exact", "pages", "required modules", "available"):
        table.add_column(col)
    for cls in SOLVERS.values():
        d = cls.describe()
        table.add_row(d["name"], str(d["exact"]), d["pages"], ", ".join(d["required_modules"]),
                      str(d["available"]))
    Console().print(table)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option(help="Where demo.json and rate_distortion.png "
                                               "go.")] = Path("sphkv-demo"),
    synthetic: Annotated[bool, typer.Option(
        "--synthetic", help="Solve a synthetic SmolLM2-shaped problem instead (no model)."
    )] = False,
    tokens: Annotated[int, typer.Option(help="Tokens prefilled (cached per kv-head).")] = 640,
    ilp_time_limit: Annotated[float, typer.Option(help="Seconds per ilp solve.")] = 10.0,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated through the compressed "
                                                 "cache.")] = 32,
    layers: Annotated[int, typer.Option(help="With --synthetic: layers (SmolLM2: 30).")] = 30,
    seed: Annotated[int, typer.Option(help="With --synthetic: seed of the problem.")] = 0,
) -> None:
    """The main job: the whole pipeline on SmolLM2 and a text shipped in the package.

    Captures a KV trace of TOKENS tokens of Pride and Prejudice, measures each item's distortion
    at six tiers (drop, 2/3/4-bit, int8, fp16) with the real codecs, solves the allocation with
    every solver at 1/16, 1/8, 1/4 and 1/2 of the fp16 bytes (pages of 16, sinks and the recent
    window at fp16), prints the comparison and draws the rate-distortion curves, then generates
    NEW_TOKENS tokens through the compressed cache at 1/4 of the fp16 bytes and reports its
    memory. With --synthetic, a synthetic problem of LAYERS × 3 kv-heads × TOKENS items replaces
    the model (no generation).
    """
    from sphkv.analysis.rd import plot_rate_distortion, solver_sweep

    if not synthetic:
        from sphkv.integrations.hf.demo import run_demo

        result = run_demo(out_dir, tokens=tokens, new_tokens=new_tokens,
                          ilp_time_limit=ilp_time_limit, console=err)
        Console().print(_summary_table(result["rows"], f"SmolLM2 trace: {result['items']:,} "
                                                       "items × 6 tiers, pages of 16"))
        gen = result["generation"]
        Console().print(
            f"generated {gen['new_tokens']} tokens through the compressed cache: peak "
            f"{gen['cache_bytes_peak']:,} bytes against {gen['fp16_bytes']:,} at fp16 "
            f"({gen['cache_bytes_peak'] / gen['fp16_bytes']:.1%}; budget "
            f"{gen['budget_bytes']:,.0f})\n…{gen['text']}")
        return
    base = synthetic_problem(layers=layers, tokens=tokens, recent=8, seed=seed)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err) as progress:
        task = progress.add_task("demo", total=None)
        rows = solver_sweep(
            base, ilp_time_limit=ilp_time_limit,
            on_step=lambda label: progress.update(task, description=label),
            on_skip=lambda f, exc: err.print(f"[yellow]skipping budget {f:g}:[/yellow] {exc}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "demo.json").write_text(json.dumps(
        {"problem": {"items": base.n_items, "tiers": base.tier_names, "page_size": base.page_size,
                     "page_overhead": base.page_overhead, "seed": seed}, "rows": rows},
        indent=2))
    Console().print(_summary_table(rows, f"synthetic SmolLM2-shaped cache: {base.n_items:,} "
                                         "items × 6 tiers, pages of 16"))
    png = plot_rate_distortion(rows, out_dir / "rate_distortion.png",
                               f"synthetic cache, {base.n_items:,} items, pages of 16")
    err.print(f"wrote {png} and {out_dir / 'demo.json'}")


def main() -> None:
    app(prog_name="sphkv")


if __name__ == "__main__":
    sys.exit(main())
