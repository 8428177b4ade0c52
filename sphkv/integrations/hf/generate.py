"""Generation with the compressed cache: a helper and the ``sphkv generate`` command."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from sphkv.integrations.hf.cache import METHODS, SphkvCache, register_attention
from sphkv.integrations.hf.config import cache_argument, fp16_cache_bytes
from sphkv.rdr.problem import InfeasibleBudgetError

__all__ = ["compressed_attention", "compressed_generate", "fp16_cache_bytes", "generate"]


@contextlib.contextmanager
def compressed_attention(model):
    """Switch ``model``'s attention to sphkv's while the block runs, then back.

    The model then reads its keys and values from a :class:`SphkvCache` passed as its cache::

        cache = SphkvCache(model.config, budget=2e6, method="rdr")
        with compressed_attention(model):
            model.generate(input_ids, max_new_tokens=64, **{cache_argument(model): cache})
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation(register_attention())
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


def compressed_generate(model, input_ids: torch.Tensor, budget: float, method: str = "rdr",
                        max_new_tokens: int = 32, attention_mask: torch.Tensor | None = None,
                        window: int = 16, sinks: int = 4, page_size: int = 16,
                        **generate_kwargs) -> tuple[torch.Tensor, SphkvCache]:
    """Greedy ``model.generate`` through a :class:`SphkvCache` of at most ``budget`` bytes.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM whose attention dispatches through ``AttentionInterface``.
    input_ids : torch.Tensor
        int ``[B, n]``, left-padded when the prompts differ in length.
    budget : float
        In (0, 1]: a fraction of what the model's own fp16 cache holds after
        ``n + max_new_tokens`` tokens (sliding and chunked layers hold their window or chunk);
        above 1: bytes.
    method : str
        A key of :data:`sphkv.rdr.methods.METHODS`.
    attention_mask : torch.Tensor, optional
        ``[B, n]``, 0 at (left) padding.
    window, sinks, page_size
        See :class:`SphkvCache`.
    **generate_kwargs
        Passed to ``model.generate``; beam search (``num_beams > 1``) is refused.

    Returns
    -------
    sequences : torch.Tensor
        ``[B, n + new]``.
    cache : SphkvCache
        With ``history`` (bytes after every write), ``peak_bytes`` and ``budget``.
    """
    if generate_kwargs.get("num_beams", 1) != 1:
        raise ValueError(f"num_beams must be 1: the compressed cache does not reorder its "
                         f"pages per beam (got num_beams={generate_kwargs['num_beams']})")
    if not budget > 0:
        raise ValueError(f"budget must be > 0 (a fraction in (0, 1] or bytes), got {budget}")
    input_ids = torch.as_tensor(input_ids).reshape(-1, input_ids.shape[-1])
    if budget <= 1:
        budget *= fp16_cache_bytes(model.config, input_ids.shape[0],
                                   input_ids.shape[1] + max_new_tokens)
    cache = SphkvCache(model.config, budget, method, window=window, sinks=sinks,
                       page_size=page_size)
    with torch.no_grad(), compressed_attention(model):
        out = model.generate(input_ids, attention_mask=attention_mask,
                             max_new_tokens=max_new_tokens, do_sample=False,
                             **{cache_argument(model): cache}, **generate_kwargs)
    return out, cache


def generate(
    model: Annotated[str, typer.Option(
        help="A causal LM: hub name, local folder, .gguf file, folder holding one .gguf, or "
             "smollm2.")] = "smollm2",
    prompt_file: Annotated[Path, typer.Option(help="The prompt, a text file (.gz allowed).",
                                              exists=True, dir_okay=False)] = ...,
    budget: Annotated[str, typer.Option(
        help="Cache bytes: a fraction of the fp16 cache of prompt + new tokens (0.125 or "
             "12.5%), or bytes (3e6, 2.5MiB).")] = "0.25",
    method: Annotated[str, typer.Option(help=f"One of {', '.join(METHODS)}.")] = "rdr",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
    window: Annotated[int, typer.Option(help="Recent tokens kept fp16 (W to 2W).")] = 16,
    json_output: Annotated[bool, typer.Option(
        "--json", help="Print exactly one JSON object on stdout, nothing else.")] = False,
) -> None:
    """Generate greedily with the compressed KV cache; report its bytes against fp16."""
    import gzip

    from sphkv.cli import parse_budget
    from sphkv.integrations.hf.model import load_model

    err = Console(stderr=True)
    if method not in METHODS:
        raise typer.BadParameter(f"{method!r}: choose one of {', '.join(METHODS)}",
                                 param_hint="--method")
    if max_new_tokens < 1:
        raise typer.BadParameter(f"must be >= 1, got {max_new_tokens}",
                                 param_hint="--max-new-tokens")
    if window < 1:
        raise typer.BadParameter(f"must be >= 1, got {window}", param_hint="--window")
    opener = gzip.open if prompt_file.suffix == ".gz" else open
    with opener(prompt_file, "rt", encoding="utf-8") as f:
        prompt = f.read()
    if not prompt.strip():
        raise typer.BadParameter(f"{prompt_file} holds no text", param_hint="--prompt-file")
    with err.status(f"loading {model}"):
        lm, tok = load_model(model)
    ids = tok(prompt, return_tensors="pt").input_ids
    fp16 = fp16_cache_bytes(lm.config, 1, ids.shape[1] + max_new_tokens)
    budget_bytes = parse_budget(budget, fp16)
    start = time.perf_counter()
    try:
        with err.status(f"generating {max_new_tokens} tokens after {ids.shape[1]} ({method})"):
            out, cache = compressed_generate(lm, ids, budget_bytes, method, max_new_tokens,
                                             window=window)
    except InfeasibleBudgetError as exc:
        err.print(f"[red]error:[/red] {exc}. The fp16 window (2 x --window tokens per layer "
                  f"and kv head) and the attention sinks come first: raise --budget or lower "
                  f"--window.")
        raise typer.Exit(2) from exc
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    result = {"text": text, "model": model, "method": method,
              "prompt_tokens": int(ids.shape[1]), "new_tokens": int(out.shape[1] - ids.shape[1]),
              "cache_bytes_peak": cache.peak_bytes, "cache_bytes_final": cache.nbytes(),
              "fp16_bytes": cache.fp16_bytes(), "budget_bytes": int(budget_bytes),
              "price": cache.price, "seconds": time.perf_counter() - start}
    if json_output:
        print(json.dumps(result))
        return
    print(text)
    err.print(f"cache peak {result['cache_bytes_peak']:,} B of budget "
              f"{result['budget_bytes']:,} B; fp16 cache {result['fp16_bytes']:,} B "
              f"({result['cache_bytes_peak'] / result['fp16_bytes']:.1%}); "
              f"{result['seconds']:.1f} s")
