"""What the prefill allocation loses by reading the prompt's queries instead of the ones that will
read the cache: perplexity of M scored tokens after N prefilled, at one budget, with the prefill
allocated from

- ``prompt``: the method's own observation (its last prompt queries),
- ``prompt-M``: the prompt's last M queries,
- ``oracle``: the scored tokens' own queries (the first ``--oracle-queries`` of them, all M by
  default), each seeing every prompt token (what no cache can know when it allocates: the
  bound on what predicting future queries could buy, or, with the first few, what deciding
  the prompt's tiers a few steps late could).

Each span of the text (span k starts at token k·(N + M + 1)) is one prefill; the three copies of
it are compressed from one deferred cache (:meth:`~sphkv.integrations.hf.SphkvCache.compress`)
and scored in chunks, as ``eval_sweep`` scores perplexity. Prints a line per span and the mean of
ppl / ppl(uncompressed) − 1 per variant; ``--out`` writes the rows as JSON.

    python -m benchmarks.query_oracle --text ../shared/data/austen/pride_and_prejudice.txt.gz \\
        --context 2048 --spans 4 --out benchmarks/results/query_oracle.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from transformers import DynamicCache

import sphkv.rdr.distortion
from benchmarks.common import environment
from sphkv.integrations.hf import load_model, read_tokens
from sphkv.integrations.hf.cache import SphkvCache
from sphkv.integrations.hf.config import cache_argument
from sphkv.integrations.hf.tasks import budget_bytes, compressed_attention, scored_nll
from sphkv.rdr.methods import METHODS

VARIANTS = ("prompt", "prompt-M", "oracle")


def _attention_over_every_token(keys: torch.Tensor, queries: torch.Tensor,
                                first: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`~sphkv.rdr.utility.attention_probs` for queries after the prompt: each sees
    every token (``first`` is None: the oracle runs on full-attention layers only)."""
    h_kv, _, d = keys.shape
    q = queries.float().view(h_kv, queries.shape[0] // h_kv, queries.shape[1], d)
    return torch.softmax(q @ keys.float()[:, None].mT / math.sqrt(d), dim=-1)


def span_rows(model, ids: torch.Tensor, context: int, scored: int, method: str = "rdr-kv",
              budget: float = 0.125, chunk: int = 8,
              oracle_queries: int | None = None) -> dict[str, float]:
    """Perplexity of the scored tokens of ``ids`` (``context + scored + 1`` ids at least):
    ``none`` and each of :data:`VARIANTS` of ``method`` at ``budget``; the oracle observes the
    first ``oracle_queries`` scored tokens' queries (all ``scored`` by default)."""
    oracle_queries = oracle_queries or scored
    if any(not a.is_full for a in SphkvCache(model.config, None).layout):
        raise ValueError("the oracle's queries see every prompt token: full-attention models "
                         "only")
    base = METHODS[method]
    methods = {"prompt": base,
               "prompt-M": dataclasses.replace(base, name=f"{method}[prompt-M]",
                                               observation=scored),
               "oracle": dataclasses.replace(base, name=f"{method}[oracle]",
                                             observation=oracle_queries)}
    with torch.no_grad():
        plain = DynamicCache(config=model.config)
        model(ids[None, :context], **{cache_argument(model): plain}, use_cache=True)
        rows = {"none": math.exp(scored_nll(model, ids, plain, context, scored, chunk).mean())}
        with compressed_attention(model):
            # the scored tokens' queries: a deferred cache keeps every query it saw
            ahead = SphkvCache(model.config, None)
            model(ids[None, :context + scored], **{cache_argument(model): ahead}, use_cache=True)
            shared = SphkvCache(model.config, None)
            model(ids[None, :context], **{cache_argument(model): shared}, use_cache=True)
            limit = budget_bytes(model, budget, context + scored)
            for name, variant in methods.items():
                oracle = contextlib.ExitStack()
                if name == "oracle":
                    prompt = shared._queries
                    shared._queries = {i: q[:, :, context:context + oracle_queries]
                                       for i, q in ahead._queries.items()}
                    oracle.enter_context(mock.patch.object(
                        sphkv.rdr.distortion, "attention_probs", _attention_over_every_token))
                with oracle:
                    cache = shared.compress(variant, limit)
                if name == "oracle":
                    shared._queries = prompt
                rows[name] = math.exp(scored_nll(model, ids, cache, context, scored, chunk).mean())
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, required=True, help="text file (.gz allowed)")
    parser.add_argument("--context", type=int, default=2048, help="N, prefilled tokens")
    parser.add_argument("--scored", type=int, default=256, help="M, scored tokens")
    parser.add_argument("--chunk", type=int, default=8, help="tokens per scoring forward")
    parser.add_argument("--spans", type=int, default=4, help="disjoint spans of the text")
    parser.add_argument("--oracle-queries", type=int,
                        help="the oracle observes the first this many scored tokens' queries "
                             "(default: all M)")
    parser.add_argument("--method", default="rdr-kv", choices=sorted(METHODS),
                        help="the method whose prefill allocation is varied")
    parser.add_argument("--budget", type=float, default=0.125, help="fraction of fp16 bytes")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (allocations move with the floating-point order)")
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    for name in ("context", "scored", "chunk", "spans"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.oracle_queries is not None and not 1 <= args.oracle_queries <= args.scored:
        parser.error(f"--oracle-queries must be in [1, --scored = {args.scored}], got "
                     f"{args.oracle_queries}")
    torch.set_num_threads(args.threads)
    model, tok = load_model()
    length = args.context + args.scored + 1
    ids = read_tokens(tok, args.text, args.spans * length)
    rows = []
    for span in range(args.spans):
        ppl = span_rows(model, ids[span * length:(span + 1) * length], args.context,
                        args.scored, args.method, args.budget, args.chunk,
                        args.oracle_queries)
        rows.append({"span": span, **ppl})
        print(f"span {span}: " + ", ".join(f"{v} {100 * (ppl[v] / ppl['none'] - 1):+.2f} %"
                                           for v in VARIANTS), flush=True)
    for v in VARIANTS:
        rel = [r[v] / r["none"] - 1 for r in rows]
        print(f"{v:9s} mean {100 * np.mean(rel):+.2f} % over {len(rel)} spans")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**environment(), "args": {
            k: str(v) for k, v in vars(args).items() if k != "out"}, "rows": rows}, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
