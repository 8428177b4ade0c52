"""The body of ``sphkv generate``: greedy generation through the compressed cache, its bytes
against fp16."""

from __future__ import annotations

import json
import time

import torch

from sphkv.cli import budget_error, err, fail, load_model_or_fail
from sphkv.integrations.hf.config import fp16_cache_bytes
from sphkv.integrations.hf.generate import compressed_generate
from sphkv.integrations.hf.sensitivity import head_weights_for
from sphkv.rdr.problem import InfeasibleBudgetError

__all__ = ["generate_command"]


def generate_command(model: str, prompt: str, budget: tuple[str, float], method: str,
                     max_new_tokens: int, window: int | None, compare: bool,
                     json_output: bool) -> None:
    """The body of ``sphkv generate`` (arguments checked by :mod:`sphkv.cli`): generate
    greedily with the compressed KV cache; report its bytes against fp16."""
    lm, tok = load_model_or_fail(model)
    ids = tok(prompt, return_tensors="pt").input_ids
    kind, value = budget
    fp16 = fp16_cache_bytes(lm.config, 1, ids.shape[1] + max_new_tokens)
    start = time.perf_counter()
    try:
        with err.status(f"generating {max_new_tokens} tokens after {ids.shape[1]} ({method})"):
            out, cache = compressed_generate(lm, ids, **{kind: value}, method=method,
                                             max_new_tokens=max_new_tokens, window=window,
                                             head_weights=head_weights_for(lm, tok, method))
    except InfeasibleBudgetError as exc:
        fail(budget_error(exc, "--budget", fp16) + "; the fp16 window (2 x --window tokens per "
             "layer and kv head) and the attention sinks come first: raise --budget or lower "
             "--window", exc)
    seconds = time.perf_counter() - start
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    result = {"text": text, "model": model, "method": method,
              "prompt_tokens": int(ids.shape[1]), "new_tokens": int(out.shape[1] - ids.shape[1]),
              "cache_bytes_peak": cache.peak_bytes, "cache_bytes_final": cache.nbytes(),
              "fp16_bytes": cache.fp16_bytes(), "budget_bytes": int(cache.budget),
              "host_bytes": cache.host_bytes(), "price": cache.price, "seconds": seconds}
    if compare:
        with err.status(f"generating {max_new_tokens} tokens with the fp16 cache"), \
                torch.no_grad():
            ref = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        result["text_fp16"] = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    if json_output:
        print(json.dumps(result))
        return
    if compare:
        print(f"fp16 cache:\n{result['text_fp16']}\n\n{method} cache:")
    print(text)
    err.print(f"cache peak {result['cache_bytes_peak']:,} B of budget "
              f"{result['budget_bytes']:,} B; fp16 cache {result['fp16_bytes']:,} B "
              f"({result['cache_bytes_peak'] / result['fp16_bytes']:.1%}); "
              + (f"host copy {result['host_bytes']:,} B (outside the budget); "
                 if result["host_bytes"] else "")
              + f"{result['seconds']:.1f} s")
