"""Perplexity of variants of one registry method, each a set of field overrides, on the same
spans: the quick way to tune a ``Method`` field on the tuning text before a held-out run.

Each span of the text (span k starts at token k·(N + M + 1)) is prefilled once into a deferred
cache; every variant is a compressed copy of it (:meth:`~sphkv.integrations.hf.SphkvCache.compress`)
scored in chunks, as ``eval_sweep`` scores perplexity. A variant is ``NAME`` alone (the method
as registered) or ``NAME:FIELD=VALUE[:FIELD=VALUE…]``. Prints a line per span and the mean of
ppl / ppl(uncompressed) − 1 per variant with its standard error over the spans.

    python -m benchmarks.method_variants --text ../shared/data/austen/pride_and_prejudice.txt.gz \\
        --method rdr-kv-recall --variants base r16:recall=16 f25:floor=0.25
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from sphkv.integrations.hf import load_model, read_tokens
from sphkv.integrations.hf.cache import SphkvCache
from sphkv.integrations.hf.config import cache_argument
from sphkv.integrations.hf.tasks import budget_bytes, compressed_attention, scored_nll
from sphkv.rdr.methods import METHODS, Method


def parse_variant(spec: str, base: Method) -> tuple[str, Method]:
    """``NAME[:FIELD=VALUE…]`` → ``(NAME, base with those fields)``; values are read as int,
    float or bool (``true``/``false``) where they parse so, else kept as text."""
    name, *fields = spec.split(":")
    overrides = {}
    known = {f.name for f in dataclasses.fields(Method)}
    for field in fields:
        key, eq, text = field.partition("=")
        if not eq or key not in known or key == "name":
            raise ValueError(f"variant {spec!r}: expected FIELD=VALUE with FIELD one of "
                             f"{', '.join(sorted(known - {'name'}))}; got {field!r}")
        overrides[key] = _value(text)
    # a distinct name: the deferred cache keys its shared prefill items by the method's repr
    return name, dataclasses.replace(base, name=f"{base.name}[{name}]", **overrides)


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def span_rows(model, ids: torch.Tensor, context: int, scored: int,
              variants: dict[str, Method], budget: float = 0.125,
              chunk: int = 8) -> dict[str, float]:
    """Perplexity of the scored tokens of ``ids`` (``context + scored + 1`` ids at least),
    uncompressed (``none``) and through each variant at ``budget``."""
    with torch.no_grad():
        plain = DynamicCache(config=model.config)
        model(ids[None, :context], **{cache_argument(model): plain}, use_cache=True)
        rows = {"none": math.exp(scored_nll(model, ids, plain, context, scored, chunk).mean())}
        limit = budget_bytes(model, budget, context + scored)
        with compressed_attention(model):
            shared = SphkvCache(model.config, None)
            model(ids[None, :context], **{cache_argument(model): shared}, use_cache=True)
            for name, method in variants.items():
                cache = shared.compress(method, limit)
                rows[name] = math.exp(scored_nll(model, ids, cache, context, scored,
                                                 chunk).mean())
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, required=True, help="text file (.gz allowed)")
    parser.add_argument("--method", default="rdr-kv-recall", choices=sorted(METHODS),
                        help="the registry method the variants change")
    parser.add_argument("--variants", nargs="+", required=True,
                        help="NAME or NAME:FIELD=VALUE[:FIELD=VALUE...]")
    parser.add_argument("--context", type=int, default=2048, help="N, prefilled tokens")
    parser.add_argument("--scored", type=int, default=256, help="M, scored tokens")
    parser.add_argument("--chunk", type=int, default=8, help="tokens per scoring forward")
    parser.add_argument("--spans", type=int, default=4, help="disjoint spans of the text")
    parser.add_argument("--budget", type=float, default=0.125, help="fraction of fp16 bytes")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (allocations move with the floating-point order)")
    args = parser.parse_args(argv)
    for name in ("context", "scored", "chunk", "spans"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    try:
        variants = dict(parse_variant(v, METHODS[args.method]) for v in args.variants)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    if len(variants) != len(args.variants):
        parser.error("--variants: each needs a name of its own")
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    length = args.context + args.scored + 1
    ids = read_tokens(tok, args.text, args.spans * length)
    rel: dict[str, list[float]] = {name: [] for name in variants}
    for span in range(args.spans):
        ppl = span_rows(model, ids[span * length:(span + 1) * length], args.context,
                        args.scored, variants, args.budget, args.chunk)
        for name in variants:
            rel[name].append(ppl[name] / ppl["none"] - 1)
        print(f"span {span}: " + ", ".join(f"{name} {100 * rel[name][-1]:+.2f} %"
                                           for name in variants), flush=True)
    for name, values in rel.items():
        spread = np.std(values, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        print(f"{name:12s} mean {100 * np.mean(values):+.2f} % ± {100 * spread:.2f} (standard "
              f"error over {len(values)} spans)")


if __name__ == "__main__":
    main()
