"""``sphkv eval``: one quality task (perplexity or pass key) of one method at one budget."""

from __future__ import annotations

import json
from pathlib import Path

import typer

__all__ = ["run_eval"]


def run_eval(task: str, model: str, text: Path, context: int, budget: tuple[str, float],
             budget_text: str, method: str, trials: int, depth: float | None, setting: str,
             scored: int, chunk: int, window: int | None, seed: int,
             json_output: bool) -> None:
    """The body of ``sphkv eval`` (arguments checked by :mod:`sphkv.cli`): perplexity or
    pass-key accuracy through the compressed KV cache of a method at a budget."""
    from sphkv.cli import budget_error, err, fail, load_model_or_fail
    from sphkv.integrations.hf.sensitivity import head_weights_for
    from sphkv.integrations.hf.tasks import passkey, perplexity
    from sphkv.integrations.hf.text import read_tokens
    from sphkv.rdr import budget_is_fraction

    # the tasks take the budget as one number (sphkv.rdr.budget_to_bytes): bytes must not
    # read as a fraction
    kind, limit = budget
    if kind == "bytes" and budget_is_fraction(limit):
        raise typer.BadParameter(f"{budget_text!r}: a cache needs more than one byte",
                                 param_hint="--budget")
    lm, tok = load_model_or_fail(model)
    need = context + scored + 1 if task == "ppl" else context
    try:
        ids = read_tokens(tok, text, need)
    except ValueError as exc:
        asked = (f"--context {context} + --scored {scored} + 1 = {need:,}" if task == "ppl"
                 else f"--context {context}")
        raise typer.BadParameter(f"{text} holds fewer tokens than {asked}; lower --context "
                                 "or give a longer text", param_hint="--text") from exc
    try:
        with err.status(f"{task}: {method} at {budget_text} on {context} tokens"):
            weights = head_weights_for(lm, tok, method)
            if task == "ppl":
                result = perplexity(lm, ids, context, scored, limit, method, chunk=chunk,
                                    window=window, head_weights=weights).to_dict()
            else:
                result = passkey(lm, tok, ids, limit, method, setting, trials, depth,
                                 seed=seed, window=window, head_weights=weights).to_dict()
    except ValueError as exc:
        fail(budget_error(exc, "--budget"), exc)
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
