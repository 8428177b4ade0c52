"""Quality sweep: texts × methods × budgets × tasks through the compressed cache.

``python -m benchmarks.eval_sweep --text FILE [FILE ...]`` runs the grid on each text (a folder
stands for every ``*.txt*`` file in it, so ``--text ../shared/data/austen`` is the four
novels); ``--quick`` a few cells at small N (CI). Each (text, task, context, setting) is split
by method into ``--jobs`` parts that run on as many worker processes; a part prefills once and
every (method, budget) run copies that prefill
(:func:`sphkv.integrations.hf.tasks.perplexity_runs` and friends). Writes
``eval[_quick].{md,json,png}`` to ``--out-dir``: date, commit, device, model, texts and trial
counts in the header; a summary table (perplexity relative to ``none`` of the same text and
context, pass key pooled over texts with its 95 % Wilson interval), the texts named with
``--tuned`` set apart from the held-out ones, then every cell; the plot has quality against
bytes, one line per method. The registry of methods, budgets and tasks lives here, not in the
library.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, environment, format_table

#: every method of the comparison; ``none`` is the uncompressed baseline
METHODS = ("none", "rdr", "rdr-ada", "rdr-scalar", "rdr-kv", "rdr-fast", "rdr-kv-ea",
           "rdr-kv-1bit", "streamingllm", "snapkv", "h2o", "keydiff", "manifoldkv",
           "manifoldkv-windowed", "kivi", "turboquant", "polarquant", "fibquant")
#: fractions of the fp16 cache
BUDGETS = (1 / 16, 1 / 8, 1 / 4)
#: the full grid, per text: perplexity at N ∈ {1k, 2k, 4k} scoring M = 256; fidelity at
#: N ∈ {1k, 2k, 4k}; pass key at N ∈ {1k, 2k, 4k} over 8 depths 10 %…90 %, both settings
#: (docs/evaluation.md says which part of it has been run, and its time)
FULL = {"methods": METHODS, "budgets": BUDGETS,
        "ppl": {"contexts": (1024, 2048, 4096), "scored": 256},
        "fidelity": {"contexts": (1024, 2048, 4096)},
        "passkey": {"contexts": (1024, 2048, 4096), "trials": 8,
                    "settings": ("query-agnostic", "query-aware")}}
#: quick: a few cells at small N (CI)
QUICK = {"methods": ("none", "rdr", "snapkv", "kivi"), "budgets": (1 / 8,),
         "ppl": {"contexts": (512,), "scored": 64}, "fidelity": {"contexts": (512,)},
         "passkey": {"contexts": (512,), "trials": 3, "settings": ("query-agnostic",)}}
TASKS = ("ppl", "fidelity", "passkey")
#: queries of the ranking's traces (``--ranking``): half predict, half measure
RANK_WINDOW = 512
#: two-sided confidence of the pass key's interval
CONFIDENCE = 0.95


def wilson(correct: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion, ``(low, high)`` in [0, 1]."""
    from scipy.stats import binomtest

    ci = binomtest(correct, trials).proportion_ci(confidence, method="wilson")
    return float(ci.low), float(ci.high)


def texts(paths: list[Path]) -> list[Path]:
    """The text files of ``--text``: a folder stands for its ``*.txt*`` files, sorted."""
    out = []
    for path in paths:
        found = sorted(path.glob("*.txt*")) if path.is_dir() else [path]
        if not found or not all(p.is_file() for p in found):
            raise FileNotFoundError(f"no text file at {path}")
        out += found
    return list(dict.fromkeys(out))


def text_name(path: Path | str) -> str:
    """A text's name in rows and tables: its file name without ``.txt`` and ``.gz``."""
    return Path(path).name.removesuffix(".gz").removesuffix(".txt")


def runs(grid: dict) -> list[tuple[str, float]]:
    """The (method, budget) pairs of a grid; ``none`` once, at 1."""
    return [(m, 1.0) if m == "none" else (m, b) for m in grid["methods"]
            for b in ((1.0,) if m == "none" else grid["budgets"])]


def groups(grid: dict, tasks: tuple[str, ...], names: tuple[str, ...] = ("",),
           spans: int = 1) -> list[dict]:
    """The shared-prefill groups: one per (text, task, context, setting), and per span of
    the text for perplexity (:func:`span_ids`)."""
    out = []
    for text in names:
        for task in tasks:
            spec = grid[task]
            for n in spec["contexts"]:
                for setting in spec.get("settings", (None,)) if task == "passkey" else (None,):
                    for span in range(spans if task == "ppl" else 1):
                        out.append({"text": text, "task": task, "context": n,
                                    "setting": setting, "span": span})
    return out


def span_ids(ids, span: int, length: int):
    """Span ``span`` of a text's token ids: the ``length`` ids from ``span · length`` on, so
    that the spans of one text are disjoint and span 0 is its opening."""
    part = ids[span * length:(span + 1) * length]
    if len(part) < length:
        raise ValueError(f"span {span} needs {(span + 1) * length:,} token ids, the text gave "
                         f"{len(ids):,}")
    return part


def units(grid: dict, todo: list[dict], jobs: int) -> list[tuple[dict, tuple[str, ...]]]:
    """The work of the sweep: each group split into ``jobs`` parts by method (every part
    prefills the group's context itself), the longest first (pass key, then by context)."""
    out = [(g, grid["methods"][i::jobs]) for g in todo for i in range(jobs)
           if grid["methods"][i::jobs]]
    return sorted(out, key=lambda u: (u[0]["task"] != "passkey", -u[0]["context"]))


def _z(confidence: float = CONFIDENCE) -> float:
    """The standard normal quantile of a two-sided ``confidence`` interval."""
    from scipy.stats import norm

    return float(norm.ppf(0.5 + confidence / 2))


def _cell(row: dict) -> tuple:
    """A perplexity row's scored tokens: its text, span and context."""
    return row.get("text", ""), row.get("span", 0), row["context"]


def paired(rows: list[dict], reference: str = "none") -> list[dict]:
    """Perplexity rows with ``vs``: ppl over that of ``reference`` on the same text, span and
    context (and budget, unless the reference is ``none``), minus 1 (absent where the sweep
    has no such row); where both runs kept their tokens' nll, also ``vs_se``, its standard
    error from the paired token differences ``d_j = nll_j − nll_j(reference)``:
    ``vs = e^{mean d} − 1``, so to first order its error is ``e^{mean d} · sd(d) / √M``. Two
    compressed methods err on mostly the same tokens, so their paired interval is much
    narrower than the difference of their intervals against ``none``."""
    import numpy as np

    def key(r):
        return _cell(r) if reference == "none" else (*_cell(r), r["budget"])

    base = {key(r): r for r in rows if r["task"] == "ppl" and r["method"] == reference}
    out = []
    for r in rows:
        if r["task"] == "ppl" and key(r) in base:
            ref = base[key(r)]
            r = {**r, "vs": r["ppl"] / ref["ppl"] - 1}
            mine, theirs = r.get("token_nll"), ref.get("token_nll")
            if mine and theirs and len(mine) == len(theirs) > 1:
                d = np.subtract(mine, theirs)
                r["vs_se"] = float(np.exp(d.mean()) * d.std(ddof=1) / np.sqrt(len(d)))
        out.append(r)
    return out


def relative(rows: list[dict]) -> list[dict]:
    """Perplexity rows with ``vs_none`` and ``vs_none_se``: :func:`paired` against ``none``."""
    names = {"vs": "vs_none", "vs_se": "vs_none_se"}
    return [{names.get(k, k): v for k, v in r.items()} for r in paired(rows)]


def _mean_cell(v: list[dict], key: str) -> str:
    """The mean of ``key`` over cells, in %; ± the half-width of its interval from the scored
    tokens where every cell has its standard error; in square brackets, from three cells on,
    the half-width of the t interval of the cells' own spread (:func:`cell_interval`); how
    many cells in brackets."""
    if not v:
        return ""
    mean = sum(r[key] for r in v) / len(v)
    if not any(r[key] for r in v):  # the reference itself
        return f"{100 * mean:+.1f} % ({len(v)})"
    spread = ""
    if all(f"{key}_se" in r for r in v):
        se = sum(r[f"{key}_se"] ** 2 for r in v) ** 0.5 / len(v)
        spread = f" ±{100 * _z() * se:.1f}"
    if len(v) >= 3:
        spread += f" [±{100 * cell_interval([r[key] for r in v]):.1f}]"
    return f"{100 * mean:+.1f} %{spread} ({len(v)})"


def cell_interval(values: list[float], confidence: float = CONFIDENCE) -> float:
    """Half-width of the t interval of the mean of ``values`` (cells: texts and spans). Unlike
    the tokens' interval it holds what varies between cells beyond the scored tokens: the
    allocation itself, which moves with the floating-point order of its distortion rows (one
    torch thread or two changed 1k cells by up to 1.3 points, docs/experiments.md)."""
    import numpy as np
    from scipy.stats import t

    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    return float(t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / np.sqrt(n))


def versus(rows: list[dict], tuned: list[str], reference: str) -> list[str]:
    """Markdown lines: per (method, budget) other than ``none`` and ``reference``, perplexity
    relative to ``reference`` at the same budget (:func:`paired`) per context, the mean over
    the held-out cells and over the tuning ones, ± its interval."""
    rows = paired(rows, reference)
    sets = _text_sets(rows, tuned)
    cols = sorted({r["context"] for r in rows if r["task"] == "ppl"})
    head = ["method", "budget"] + [f"ppl {_tokens(n)} {label}" for label, _ in sets
                                   for n in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, budget in _runs(rows):
        if method in ("none", reference):
            continue
        cells = [method, _budget(budget), *_ppl_cells(rows, method, budget, sets, cols, "vs")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _ppl_cells(rows: list[dict], method: str, budget: float, sets: list, contexts: list[int],
               key: str) -> list[str]:
    """A method's perplexity cells of a summary row: per text set and context, the mean of
    ``key`` over its cells (:func:`_mean_cell`)."""
    return [_mean_cell([r for r in rows if r["task"] == "ppl" and r["method"] == method
                        and r["budget"] == budget and r["context"] == n and key in r
                        and r.get("text", "") in which], key)
            for _, which in sets for n in contexts]


def _text_sets(rows: list[dict], tuned: list[str]) -> list[tuple[str, list[str]]]:
    """``("held-out", names)`` and ``("tuned", names)``, those that have texts."""
    names = sorted({r.get("text", "") for r in rows})
    return [(label, which) for label, which in
            (("held-out", [t for t in names if t not in tuned]),
             ("tuned", [t for t in names if t in tuned])) if which]


def _runs(rows: list[dict]) -> list[tuple[str, float]]:
    """The (method, budget) pairs of the rows: ``none``, then by budget, dearest first."""
    return sorted({(r["method"], r["budget"]) for r in rows},
                  key=lambda mb: (mb[1] != 1.0, -mb[1], _method_order(mb[0])))


def _tokens(n: int) -> str:
    """A context in a column's name: 2k for 2,048 tokens."""
    return f"{n // 1024}k" if n % 1024 == 0 else f"{n:,}"


def _budget(budget: float) -> str:
    """A budget in a summary: 1/8 where it is one over a whole number, else as given."""
    whole = round(1 / budget)
    return f"1/{whole}" if whole != 1 and abs(1 / budget - whole) < 1e-9 else f"{budget:g}"


def summary(rows: list[dict], tuned: list[str]) -> list[str]:
    """Markdown lines: per (method, budget), perplexity relative to ``none`` per context on the
    held-out texts and on the tuning ones (mean over their cells — a text's spans each count
    once —, how many in brackets), and the pass key per (context, setting) pooled over the
    held-out texts, or every text if none is held out (correct of trials, 95 % Wilson
    interval)."""
    rows = relative(rows)
    sets = _text_sets(rows, tuned)
    held = [t for label, which in sets if label == "held-out" for t in which]
    pooled = held or [t for _, which in sets for t in which]  # the pass key's texts
    ppl_cols = sorted({r["context"] for r in rows if r["task"] == "ppl"})
    pk_cols = sorted({(r["context"], r["setting"]) for r in rows if r["task"] == "passkey"})
    head = (["method", "budget"]
            + [f"ppl {_tokens(n)} {label}" for label, _ in sets for n in ppl_cols]
            + [f"pass key {_tokens(n)} {s.removeprefix('query-')}"
               + ("" if held else " (tuned)") for n, s in pk_cols])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, budget in _runs(rows):
        cells = [method, _budget(budget),
                 *_ppl_cells(rows, method, budget, sets, ppl_cols, "vs_none")]
        for n, setting in pk_cols:
            v = [r for r in rows if r["task"] == "passkey" and r["method"] == method
                 and r["budget"] == budget and r["context"] == n and r["setting"] == setting
                 and r.get("text", "") in pooled]
            if v:
                k, t = sum(r["correct"] for r in v), sum(r["trials"] for r in v)
                lo, hi = wilson(k, t)
                cells.append(f"{k}/{t} [{lo:.2f}, {hi:.2f}]")
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# the worker's model, tokenizer and token ids per text (loaded once per worker process)
_WORKER: dict = {}


def _check_positions(model: str, positions: int) -> None:
    """Refuse, before any work, contexts whose tokens the model has no positions for."""
    from transformers import AutoConfig

    from sphkv.integrations.hf.model import resolve_model

    path, kwargs = resolve_model(model)
    limit = getattr(AutoConfig.from_pretrained(path, **kwargs), "max_position_embeddings", None)
    if limit is not None and positions > limit:
        raise SystemExit(f"--contexts: the longest context and its scored tokens take "
                         f"{positions} positions, more than the model's {limit}")


def _load(model: str, paths: tuple[str, ...], tokens: int, threads: int, span: int) -> None:
    """The worker's model, tokenizer and the first ``tokens`` ids of every text; perplexity's
    spans are ``span`` ids long."""
    import torch

    from sphkv.integrations.hf import load_model, read_tokens

    torch.set_num_threads(threads)
    _WORKER["model"], _WORKER["tok"] = load_model(model)
    _WORKER["ids"] = {text_name(p): read_tokens(_WORKER["tok"], p, tokens) for p in paths}
    _WORKER["span"] = span


def _head_weights(methods: tuple[str, ...]):
    """The worker model's head sensitivities where a method needs them (calibrated once per
    worker on the package's Pride and Prejudice opening, the tuning text), else None."""
    from sphkv.integrations.hf.sensitivity import head_weights_for
    from sphkv.rdr import get_method

    sensitive = next((m for m in methods if m != "none" and get_method(m).sensitive), None)
    if sensitive is None:
        return None
    if "weights" not in _WORKER:
        _WORKER["weights"] = head_weights_for(_WORKER["model"], _WORKER["tok"], sensitive)
    return _WORKER["weights"]


def run_unit(grid: dict, g: dict, methods: tuple[str, ...], chunk: int,
             window: int | None = None, observation: int | None = None) -> list[dict]:
    """The rows of one group's runs of ``methods`` (every budget), in a worker; ``window``: the
    caches' W (None: each cache's budget chooses it); ``observation``: the prompt queries
    perplexity's caches observe (None: each method's own)."""
    from sphkv.integrations.hf.tasks import fidelity_runs, passkey_runs, perplexity_runs

    model, tok, ids = _WORKER["model"], _WORKER["tok"], _WORKER["ids"][g["text"]]
    pairs = runs({**grid, "methods": methods})
    n = g["context"]
    weights = _head_weights(methods)
    if g["task"] == "ppl":
        ids = span_ids(ids, g.get("span", 0), _WORKER["span"])
        results = perplexity_runs(model, ids, n, grid["ppl"]["scored"], pairs, chunk=chunk,
                                  window=window, observation=observation, head_weights=weights)
        quality = [{"ppl": r.ppl, "nll": r.nll, "token_nll": r.token_nll,
                    "bytes_vs_fp16": r.cache_bytes_peak / r.fp16_bytes} for r in results]
    elif g["task"] == "fidelity":
        results = fidelity_runs(model, ids, n, pairs, window=window, head_weights=weights)
        quality = [{"error": r.mean_error, "layer_errors": r.layer_errors,
                    "bytes_vs_fp16": r.cache_bytes / r.fp16_bytes} for r in results]
    else:
        results = passkey_runs(model, tok, ids[:n], pairs, g["setting"],
                               trials=grid["passkey"]["trials"], window=window,
                               head_weights=weights)
        quality = [{"accuracy": r.accuracy, "correct": r.correct, "trials": r.n_trials,
                    "interval": wilson(r.correct, r.n_trials),
                    "bytes_vs_fp16": r.cache_bytes_peak / r.fp16_bytes} for r in results]
    return [{**g, "method": method, "budget": budget, **q, "seconds": r.seconds}
            for (method, budget), q, r in zip(pairs, quality, results, strict=True)]


def _method_order(method: str) -> tuple:
    return (METHODS.index(method), "") if method in METHODS else (len(METHODS), method)


def _order(row: dict) -> tuple:
    return (row.get("text", ""), TASKS.index(row["task"]), row["context"], row["setting"] or "",
            row.get("span", 0), _method_order(row["method"]), row["budget"])


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Run every unit on ``--jobs`` worker processes; rows for the table and the header."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    grid = QUICK if args.quick else FULL
    if args.methods:
        grid = {**grid, "methods": tuple(args.methods)}
    if args.budgets:
        grid = {**grid, "budgets": tuple(args.budgets)}
    if args.scored:
        grid = {**grid, "ppl": {**grid["ppl"], "scored": args.scored}}
    if args.contexts:
        grid = {**grid, **{task: {**grid[task], "contexts": tuple(args.contexts)}
                           for task in TASKS}}
    if args.passkey_trials or args.settings:
        grid = {**grid, "passkey": {**grid["passkey"],
                                    "trials": args.passkey_trials or grid["passkey"]["trials"],
                                    "settings": tuple(args.settings
                                                      or grid["passkey"]["settings"])}}
    paths = texts(args.text)
    names = tuple(text_name(p) for p in paths)
    header = {"model": args.model, "texts": list(names), "tuned": list(args.tuned or []),
              "quick": args.quick, "ppl_scored": grid["ppl"]["scored"], "ppl_chunk": args.chunk,
              "window": args.window, "observation": args.observation, "spans": args.spans,
              "passkey_trials": grid["passkey"]["trials"], "jobs": args.jobs,
              "threads": args.threads}
    todo = groups(grid, tuple(args.tasks), names, args.spans)
    work = units(grid, todo, args.jobs)
    longest = max(g["context"] for g in todo) + grid["ppl"]["scored"] + 1
    _check_positions(args.model, longest - 1)
    span = max(grid["ppl"]["contexts"]) + grid["ppl"]["scored"] + 1  # a perplexity span's ids
    threads = max(1, args.threads // args.jobs)
    rows: list[dict] = []
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_load,
                             initargs=(args.model, tuple(map(str, paths)),
                                       max(longest, args.spans * span), threads, span)) as pool, \
            Progress(TextColumn("{task.description}"), BarColumn(),
                     TextColumn("{task.completed}/{task.total} units"),
                     TimeElapsedColumn()) as progress:
        bar = progress.add_task("eval sweep", total=len(work))
        futures = {pool.submit(run_unit, grid, g, methods, args.chunk, args.window,
                               args.observation): (g, methods)
                   for g, methods in work}
        for future in as_completed(futures):
            g, methods = futures[future]
            rows += future.result()
            progress.console.print(f"{g['text']} {g['task']} N={g['context']} "
                                   f"{g['setting'] or ''} "
                                   + (f"span {g['span']} " if args.spans > 1 else "")
                                   + f"{', '.join(methods)}: done at "
                                   f"{time.perf_counter() - start:.0f} s")
            progress.advance(bar)
            # the units done so far, should the sweep be stopped
            (args.out_dir / f"{args.name}.partial.json").write_text(
                json.dumps({**environment(), **header, "rows": sorted(rows, key=_order)},
                           indent=2))
    header["wall_seconds"] = round(time.perf_counter() - start)
    return sorted(rows, key=_order), header


def _mean_over_texts(cell: list[dict], method: str, key: str) -> list[tuple[float, float]]:
    """``(budget, value)`` of a method in one panel, the mean over the panel's texts (a pass
    key pooled: correct over trials)."""
    out = []
    for budget in sorted({r["budget"] for r in cell if r["method"] == method}):
        v = [r for r in cell if r["method"] == method and r["budget"] == budget and key in r]
        if key == "accuracy":
            out.append((budget, sum(r["correct"] for r in v) / sum(r["trials"] for r in v)))
        elif v:
            out.append((budget, sum(r[key] for r in v) / len(v)))
    return out


def plot(rows: list[dict], path: Path, tuned: list[str] | tuple = ()) -> bool:
    """Quality against bytes (fraction of fp16), one line per method, a panel per task,
    context and setting, over the held-out texts (every text if all were tuned on): perplexity
    as the mean ratio to ``none`` on the same text, the pass key pooled, fidelity the mean;
    False, and no file, where nothing can be drawn (perplexity runs without ``none``);
    ``none`` is a horizontal reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [{**r, "ratio": 1 + r["vs_none"]} if "vs_none" in r else r for r in relative(rows)]
    held = [r for r in rows if r.get("text", "") not in tuned]
    rows = held or rows
    panels = sorted({(r["task"], r["context"], r["setting"] or "") for r in rows},
                    key=lambda p: (TASKS.index(p[0]), p[1], p[2]))
    metric = {"ppl": ("ratio", "perplexity / none's"),
              "fidelity": ("error", "attention-output rel. error"),
              "passkey": ("accuracy", "pass-key accuracy")}
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.8 * nrows), squeeze=False)
    # RDR's methods in reds, drawn last and thick; drop-only methods in blues, quantize-only in
    # greens, thin and dotted
    methods = sorted(dict.fromkeys(r["method"] for r in rows), key=lambda m: m.startswith("rdr"))
    family = {"rdr": ["#d62728", "#8c1a1a", "#ff7f7f"], "drop": list(plt.get_cmap("Blues")(
        [0.45, 0.55, 0.65, 0.75, 0.85, 0.95])), "quantize": list(plt.get_cmap("Greens")(
        [0.5, 0.65, 0.8, 0.95]))}
    quantize_only = {"kivi", "turboquant", "polarquant", "fibquant"}
    colors, used = {}, {"rdr": 0, "drop": 0, "quantize": 0}
    for method in methods:
        kind = ("rdr" if method.startswith("rdr") else
                "quantize" if method in quantize_only else "drop")
        colors[method] = family[kind][used[kind] % len(family[kind])]
        used[kind] += 1
    for ax, (task, n, setting) in zip(axes.flat, panels, strict=False):
        key, label = metric[task]
        cell = [r for r in rows if (r["task"], r["context"], r["setting"] or "") ==
                (task, n, setting)]
        for method in methods:
            pts = _mean_over_texts(cell, method, key)
            if not pts:
                continue
            if method == "none":
                ax.axhline(pts[0][1], color="black", ls="--", lw=1, label="none (fp16)")
            elif pts:
                rdr = method.startswith("rdr")
                ax.plot(*zip(*pts, strict=True), "-" if rdr else ":", marker="o",
                        ms=5 if rdr else 3, color=colors[method], lw=3 if rdr else 1.2,
                        zorder=3 if rdr else 2, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cache bytes (fraction of the fp16 cache)")
        ax.set_ylabel(label)
        if task == "ppl":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
        n_texts = len({r.get("text", "") for r in cell})
        ax.set_title(f"{task} N={n} {setting}".strip()
                     + (f" ({n_texts} texts)" if n_texts > 1 else ""), fontsize=10)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:  # every method once, from whichever panel draws it
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if not labels:
        plt.close(fig)
        return False
    order = sorted(range(len(labels)), key=lambda i: not labels[i].startswith("rdr"))
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="lower center",
               ncol=min(len(labels), 7), fontsize=8)
    fig.suptitle("RDR (red) against drop-only (blue) and quantize-only (green) methods at "
                 "equal bytes")
    fig.tight_layout(rect=(0, 0.08 if len(labels) > 7 else 0.05, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(rows: list[dict], header: dict, out_dir: Path, name: str) -> tuple[Path, ...]:
    """``name.json`` (header and rows), ``name.md`` (header lines and the table), ``name.png``
    (where :func:`plot` draws something)."""
    # a table rewritten from JSON keeps the date, commit and device of its run
    env = {**environment(), **{k: header[k] for k in ("date", "commit", "device", "python",
                                                      "torch") if k in header}}
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps({**env, **header, "rows": rows}, indent=2))
    md = out_dir / f"{name}.md"
    names = header.get("texts") or [text_name(header["text"])]
    tuned = header.get("tuned") or []
    held = [t for t in names if t not in tuned]
    lines = [f"# {name} — {env['date']} — commit {env['commit']} — {env['device']}", "",
             f"model {header['model']}; texts: held out {', '.join(held) or 'none'}; methods "
             f"tuned on {', '.join(tuned) or 'none named'}; perplexity scores "
             f"{header['ppl_scored']} tokens (chunks of {header['ppl_chunk']})"
             + (f" in each of {header['spans']} disjoint spans per text"
                if header.get("spans", 1) > 1 else "") + "; window W = "
             f"{header.get('window', 16) or 'chosen by the budget'}"
             + (f"; perplexity's caches observe {header['observation']} prompt queries"
                if header.get("observation") else "") + "; pass key: "
             f"trials per cell in its table; "
             f"{header.get('jobs', 1)} worker processes, {header['threads']} threads in all"
             + (f", {header['wall_seconds']} s wall (runs merged: their sum)"
                if "wall_seconds" in header else "")
             + "; seconds per run exclude the shared prefill", "",
             "## summary", "",
             "Perplexity: (ppl / ppl of none on the same text, span and context) − 1, the "
             "mean over the texts' spans (how many in brackets), ± the half-width of its "
             f"{CONFIDENCE:.0%} "
             "interval from the scored tokens' paired differences to none (runs that kept "
             "them), and in square brackets, from three cells on, that of the cells' own "
             "spread (t interval); pass key: keys found of trials over the held-out texts, "
             f"[{CONFIDENCE:.0%} Wilson interval].", "",
             *summary(rows, tuned), ""]
    reference = header.get("versus")
    if reference:
        lines += [f"## versus {reference}", "",
                  f"Perplexity relative to {reference} at the same budget, text, span and "
                  f"context, − 1: the mean over the cells, ± the half-width of its "
                  f"{CONFIDENCE:.0%} interval from the scored tokens' paired differences to "
                  f"{reference}, [±] that of the cells' spread.", "",
                  *versus(rows, tuned, reference), ""]
    table_rows = [{**r, "interval": "[{:.2f}, {:.2f}]".format(*r["interval"])}
                  if "interval" in r else r for r in relative(rows)]
    table_rows = [{**r, "vs_none_ci": "±{:.4f}".format(_z() * r["vs_none_se"])}
                  if "vs_none_se" in r else r for r in table_rows]
    for task in TASKS:
        cell = [r for r in table_rows if r["task"] == task]
        if cell:
            cols = {"ppl": ["ppl", "vs_none", "vs_none_ci"], "fidelity": ["error"],
                    "passkey": ["correct", "trials", "interval"]}[task]
            spans = ["span"] if any(r.get("span", 0) for r in cell) else []
            lines += [f"## {task}", "", format_table(cell, ["text", *spans, "setting",
                                                            "context", "method", "budget",
                                                            "bytes_vs_fp16", *cols,
                                                            "seconds"]), ""]
    md.write_text("\n".join(lines) + "\n")
    png = out_dir / f"{name}.png"
    if not plot(rows, png, tuned):
        print(f"no plot: perplexity is drawn relative to none, which {name} did not run "
              "(merge it with a run that did: --from-json)")
        return md, js
    return md, js, png


def merge(data: list[dict]) -> tuple[list[dict], dict]:
    """Rows of several runs, a later run's cell (text, task, context, setting, method,
    budget) replacing an earlier one's, and the first run's header naming every run's commit
    and text, the texts any run was tuned on, and the sum of their wall times."""
    cells = {}
    for d in data:
        for r in d["rows"]:
            # a run of one text (older files) names it in the header only
            r = {"text": text_name(d.get("text", "")), **r}
            cells[(r["text"], r["task"], r["context"], r.get("setting"), r.get("span", 0),
                   r["method"], r["budget"])] = r
    commits = dict.fromkeys(d["commit"] for d in data)
    header = {k: v for k, v in data[0].items() if k not in ("rows", "text")}
    header["texts"] = sorted({r["text"] for r in cells.values()})
    header["tuned"] = sorted({t for d in data for t in d.get("tuned", [])})
    if all("wall_seconds" in d for d in data):
        header["wall_seconds"] = sum(d["wall_seconds"] for d in data)
    return sorted(cells.values(), key=_order), {**header, "commit": ", ".join(commits)}


def ranking(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """How well each method's distortion model ranks the true attention-output error of queries
    it did not observe: per text, a trace of ``--ranking`` tokens with a window of ``RANK_WINDOW``
    queries, the first half predicting and the last half measuring
    (:func:`sphkv.rdr.distortion.fidelity` with the method's ladder, estimator, floor, prior
    and exactness); Spearman ρ per layer, its median over layers, pooled over the non-fp16 tiers and
    for the drop tier alone."""
    import numpy as np
    import torch

    from sphkv.integrations.hf import capture_trace, load_model, read_tokens
    from sphkv.rdr import METHODS as REGISTRY
    from sphkv.rdr.distortion import fidelity

    names = args.methods or ("rdr", "rdr-kv", "rdr-kv-ea")
    for name in names:
        if REGISTRY[name].sensitive:
            raise SystemExit(f"--ranking: {name} weighs heads by their sensitivity, which the "
                             "ranking's per-layer output errors leave out")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    rows = []
    for path in texts(args.text):
        trace = capture_trace(model, read_tokens(tok, path, args.ranking), window=RANK_WINDOW)
        for name in names:
            method = REGISTRY[name]
            report = fidelity(trace, method.tier_set(trace.head_dim), method.get_estimator(),
                              floor=method.floor, prior=method.prior, exact=method.exact)
            rows.append({"text": text_name(path), "method": name, "tokens": args.ranking,
                         "rho": report.median,
                         "rho_drop": float(np.median(report.per_tier["drop"]))})
            print(rows[-1], flush=True)
    return rows, {"model": args.model, "ranking_window": RANK_WINDOW}


def _window(text: str) -> int | None:
    """``--window``: a positive number of tokens, or ``budget`` (None)."""
    if text == "budget":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'budget', got {text!r}")
    return int(text)


def _choices() -> tuple[str, ...]:
    """``none``, the compared methods, then any other method of the registry (variants)."""
    from sphkv.rdr import METHODS as REGISTRY

    return (*METHODS, *(m for m in REGISTRY if m not in METHODS))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few cells at small N")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", type=Path, nargs="+", required=True,
                        help="text files (.gz allowed); a folder stands for its *.txt* files")
    parser.add_argument("--tuned", nargs="+", metavar="NAME",
                        help="texts (file names without .txt.gz) the methods were tuned on: "
                             "the summary and the plot set them apart from the held-out ones")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=_choices(),
                        help="run only these methods (merge with earlier runs: --from-json)")
    parser.add_argument("--budgets", type=float, nargs="+",
                        help="run only these budgets (fractions of the fp16 cache)")
    parser.add_argument("--contexts", type=int, nargs="+",
                        help="context lengths (default: 1024 2048 4096; a context and its "
                             "scored tokens must fit the model's positions, 8,192 for SmolLM2)")
    parser.add_argument("--settings", nargs="+", choices=FULL["passkey"]["settings"],
                        help="pass key: run only these settings")
    parser.add_argument("--scored", type=int,
                        help="perplexity: scored tokens (default: the grid's)")
    parser.add_argument("--spans", type=int, default=1,
                        help="perplexity: score this many disjoint spans of each text (the "
                             "first at its opening, each as long as the longest context and "
                             "its scored tokens); every span is a cell of the summary's mean, "
                             "so its interval narrows as 1/√spans")
    parser.add_argument("--versus", metavar="METHOD", choices=_choices(),
                        help="also tabulate perplexity relative to METHOD at the same budget, "
                             "with the interval of the paired token differences (one lever "
                             "against another: much narrower than their intervals against "
                             "none)")
    parser.add_argument("--passkey-trials", type=int,
                        help="pass key: trials per cell (default: the grid's)")
    parser.add_argument("--chunk", type=int, default=8,
                        help="perplexity: tokens per teacher-forced forward")
    parser.add_argument("--window", type=_window, default=None,
                        help="the caches' window W: between W and 2W recent tokens kept at fp16 "
                             "(reserved from the budget); 'budget' (default): each cache chooses "
                             "16; 8 where 16's reserve would take more than a sixth of its "
                             "budget; doubled up to 256 while theirs takes at most a "
                             "sixteenth. Keep --chunk at most W (at most 8 with 'budget')")
    parser.add_argument("--observation", type=int, metavar="QUERIES",
                        help="perplexity: the caches observe the prompt's last QUERIES queries "
                             "for the distortion rows (default: each method's own, 64 for the "
                             "RDR methods)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="worker processes (each loads the model; the cores are shared)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads in all (each worker gets threads // jobs)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", help="output file stem (default eval or eval_quick)")
    parser.add_argument("--ranking", type=int, metavar="TOKENS",
                        help="instead of the sweep: rank correlation of each method's "
                             "distortion model with the true error of unobserved queries, on a "
                             "trace of TOKENS tokens per text (default methods: rdr, rdr-kv, "
                             "rdr-kv-ea); writes NAME.json and NAME.md")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="rewrite the table and plot from earlier runs' JSON: their rows "
                             "merged, a later file's cell replacing an earlier one's; the "
                             "first one's header, with every run's commit")
    args = parser.parse_args(argv)
    if args.spans < 1:
        parser.error(f"--spans must be at least 1, got {args.spans}")
    if args.observation is not None and args.observation < 1:
        parser.error(f"--observation must be at least 1 query, got {args.observation}")
    shortest, label = args.window, args.window
    if args.window is None:
        from sphkv.integrations.hf.cache import WINDOW_SHORT

        shortest, label = WINDOW_SHORT, f"budget, as short as {WINDOW_SHORT}"
    if not 1 <= args.chunk <= shortest:
        parser.error(f"--chunk must be between 1 and --window ({label}), got {args.chunk}: a "
                     f"longer chunk's queries see its tokens at fp16 beyond the window")
    name = args.name = args.name or ("eval_quick" if args.quick else "eval")
    if args.ranking:
        rows, header = ranking(args)
        env = environment()
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{name}.json").write_text(json.dumps({**env, **header, "rows": rows},
                                                              indent=2))
        table = format_table(rows, ["text", "method", "tokens", "rho", "rho_drop"])
        (args.out_dir / f"{name}.md").write_text(
            f"# {name} — {env['date']} — commit {env['commit']} — {env['device']}\n\n"
            f"Spearman ρ (median over layers) between predicted distortion and the true "
            f"attention-output error of the window's last {RANK_WINDOW // 2} queries, "
            f"predicted from its first {RANK_WINDOW // 2}\n\n{table}\n")
        print(table)
        return
    if args.from_json:
        data = [json.loads(path.read_text()) for path in args.from_json]
        rows, header = merge(data)
        if args.tuned:
            header["tuned"] = list(args.tuned)
    else:
        rows, header = run(args)
    if args.versus:
        header["versus"] = args.versus
    paths = write(rows, header, args.out_dir, name)
    print(paths[0].read_text())
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
