"""``sphkv eval``: one quality task (perplexity or pass key) of one method at one budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sphkv.integrations.hf.tasks import NONE, SETTINGS
from sphkv.rdr.methods import METHODS
from sphkv.rdr.problem import InfeasibleBudgetError

__all__ = ["evaluate"]

TASKS = ("ppl", "passkey")


def evaluate(
    task: Annotated[str, typer.Option(help="ppl (perplexity) or passkey.")] = ...,
    model: Annotated[str, typer.Option(help="Hugging Face causal LM name or path, or smollm2.")]
    = "smollm2",
    text: Annotated[Path, typer.Option(help="Text file (.gz allowed): the context and, for "
                                            "ppl, the scored continuation; the passkey "
                                            "haystack.", exists=True, dir_okay=False)] = ...,
    context: Annotated[int, typer.Option(help="N: context tokens (the haystack for passkey).")]
    = 1024,
    budget: Annotated[str, typer.Option(
        help="Cache bytes: a fraction of the fp16 cache of every token the task feeds (0.125 "
             "or 12.5%), or bytes (3e6, 2.5MiB). Ignored for --method none.")] = "0.125",
    method: Annotated[str, typer.Option(help=f"{NONE} (uncompressed) or one of "
                                             f"{', '.join(METHODS)}.")] = "rdr",
    trials: Annotated[int, typer.Option(help="passkey: trials (keys and depths).")] = 4,
    depth: Annotated[float | None, typer.Option(
        help="passkey: depth of the key in [0, 1]; default: trials spread over 10%-90%.")]
    = None,
    setting: Annotated[str, typer.Option(help=f"passkey: {' or '.join(SETTINGS)}.")]
    = "query-agnostic",
    scored: Annotated[int, typer.Option(help="ppl: M, tokens scored after the context.")] = 256,
    chunk: Annotated[int, typer.Option(help="ppl: tokens per teacher-forced forward.")] = 16,
    window: Annotated[int, typer.Option(help="Recent tokens kept fp16 (W to 2W).")] = 16,
    seed: Annotated[int, typer.Option(help="passkey: seed of the keys.")] = 0,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout, nothing else.")] = False,
) -> None:
    """Perplexity or pass-key accuracy through the compressed KV cache of a method at a
    budget."""
    from sphkv.cli import parse_budget
    from sphkv.integrations.hf.model import load_model
    from sphkv.integrations.hf.tasks import passkey, perplexity
    from sphkv.integrations.hf.text import read_tokens

    err = Console(stderr=True)
    if task not in TASKS:
        raise typer.BadParameter(f"{task!r}: choose one of {', '.join(TASKS)}",
                                 param_hint="--task")
    if method != NONE and method not in METHODS:
        raise typer.BadParameter(f"{method!r}: choose {NONE} or one of {', '.join(METHODS)}",
                                 param_hint="--method")
    if setting not in SETTINGS:
        raise typer.BadParameter(f"{setting!r}: choose one of {', '.join(SETTINGS)}",
                                 param_hint="--setting")
    if context < 1:
        raise typer.BadParameter(f"{context}: need at least 1 token", param_hint="--context")
    if depth is not None and not 0 <= depth <= 1:
        raise typer.BadParameter(f"{depth}: the depth is in [0, 1]", param_hint="--depth")
    # with full cost 1, a fraction stays a fraction and bytes stay bytes: the task converts
    limit = parse_budget(budget, 1.0)
    with err.status(f"loading {model}"):
        lm, tok = load_model(model)
    need = context + scored + 1 if task == "ppl" else context
    try:
        ids = read_tokens(tok, text, need)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--text") from exc
    try:
        with err.status(f"{task}: {method} at {budget} on {context} tokens"):
            if task == "ppl":
                result = perplexity(lm, ids, context, scored, limit, method, chunk=chunk,
                                    window=window).to_dict()
            else:
                result = passkey(lm, tok, ids, limit, method, setting, trials, depth,
                                 seed=seed, window=window).to_dict()
    except InfeasibleBudgetError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    except ValueError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    result = {"task": task, "model": model, "text": text.name, **result}
    if json_output:
        print(json.dumps(result))
        return
    share = result["cache_bytes_peak"] / result["fp16_bytes"]
    if task == "ppl":
        print(f"ppl {result['ppl']:.3f} (nll {result['nll']:.4f}) over {scored} tokens after "
              f"{context}")
    else:
        print(f"passkey {result['correct']}/{result['n_trials']} ({setting}) in a {context}-token "
              f"haystack")
    err.print(f"{method}: cache peak {result['cache_bytes_peak']:,} B, {share:.1%} of fp16 "
              f"{result['fp16_bytes']:,} B; {result['seconds']:.1f} s")
