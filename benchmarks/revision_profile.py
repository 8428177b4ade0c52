"""Where a recalling method's revision spends its time, on the CPU or a GPU.

A random model with real layer shapes (``benchmarks.ops.generate.SHAPES``) prefills N tokens
into a :class:`~sphkv.integrations.hf.SphkvCache` at a fraction of the fp16 bytes and decodes
until the cache has revised its allocation ``--repeats`` + 1 times (every ``Method.recall``
tokens, as in generation). Each revision is split into its parts by timing the methods it
calls (the device synchronized around each):

- ``rows``: the distortion rows of every token seen (``SphkvCache._distortion_rows``);
- ``items``: the rest of building the allocator's items from the host copy
  (``SphkvCache._tokens`` less ``rows``);
- ``solve``: the greedy solve (``OnlineAllocator._solve``);
- ``writes``: encoding the tokens that move at their new tiers (``OnlineAllocator._arrive``);
- ``other``: the rest (matching kept tokens to their rows, the cache's bookkeeping).

Prints the median of each part over the revisions after the first (which pays one-off
costs), in milliseconds.

    python -m benchmarks.revision_profile --shapes smollm2 --context 2048 --threads 2
    python -m benchmarks.revision_profile --shapes llama-8b-layers --context 32768   # a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.ops.generate import SHAPES
from sphkv.integrations.hf import SphkvCache, cache_argument, compressed_attention
from sphkv.integrations.hf.generate import budget_bytes
from sphkv.rdr.methods import METHODS

PARTS = ("rows", "items", "solve", "writes", "other", "total")


def _timed(obj, name: str, spent: dict, key: str, sync) -> None:
    """Wrap ``obj.name`` so that each call adds its seconds to ``spent[key]``."""
    inner = getattr(obj, name)

    def call(*args, **kwargs):
        sync()
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            sync()
            spent[key] += time.perf_counter() - start

    setattr(obj, name, call)


def profile(shape: str, context: int, method: str, fraction: float, repeats: int,
            device: torch.device) -> dict[str, list[float]]:
    """Per part, the milliseconds of each revision after the first."""
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], vocab_size=32000, attn_implementation="sdpa")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    steps = (repeats + 1) * METHODS[method].recall
    ids = torch.randint(1, config.vocab_size, (1, context + steps), device=device)
    cache = SphkvCache(config, budget_bytes(config, 1, context + steps, fraction), method)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spent: dict[str, float] = defaultdict(float)
    runs: dict[str, list[float]] = {part: [] for part in PARTS}
    revise = cache._revise

    def timed_revise():
        spent.clear()  # what the admissions since the last revision spent
        sync()
        start = time.perf_counter()
        revise()
        sync()
        parts = {"rows": spent["rows"], "items": spent["tokens"] - spent["rows"],
                 "solve": spent["solve"], "writes": spent["writes"],
                 "total": time.perf_counter() - start}
        parts["other"] = parts["total"] - sum(v for k, v in parts.items() if k != "total")
        for part in PARTS:
            runs[part].append(1e3 * parts[part])

    with torch.no_grad(), compressed_attention(model, graphs=False):
        model(ids[:, :context], **{cache_argument(model): cache}, use_cache=True)
        _timed(cache, "_distortion_rows", spent, "rows", sync)
        _timed(cache, "_tokens", spent, "tokens", sync)
        _timed(cache.allocator, "_solve", spent, "solve", sync)
        _timed(cache.allocator, "_arrive", spent, "writes", sync)
        cache._revise = timed_revise
        for t in range(context, context + steps):
            model(ids[:, t:t + 1], **{cache_argument(model): cache}, use_cache=True)
    if len(runs["total"]) < repeats + 1:
        raise RuntimeError(f"{method} revised {len(runs['total'])} times in {steps} steps, "
                           f"expected {repeats + 1}")
    return {part: values[1:] for part, values in runs.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2", choices=sorted(SHAPES),
                        help="layer shapes of the random model")
    parser.add_argument("--context", type=int, default=2048, help="N, prefilled tokens")
    recalling = sorted(name for name, m in METHODS.items() if m.recall)
    parser.add_argument("--method", default="rdr-kv-recall", choices=recalling,
                        help="a recalling method")
    parser.add_argument("--fraction", type=float, default=0.125,
                        help="budget as a fraction of the fp16 bytes")
    parser.add_argument("--repeats", type=int, default=5,
                        help="revisions timed (after one more that is not)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU")
    args = parser.parse_args(argv)
    if args.context < 64:
        parser.error(f"--context must be >= 64 tokens, got {args.context}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = profile(args.shapes, args.context, args.method, args.fraction, args.repeats, device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads")
    print(f"{args.method}, {args.shapes} shapes, N = {args.context}, budget {args.fraction} "
          f"of fp16, {where}: median of {args.repeats} revisions, ms")
    print("| " + " | ".join(PARTS) + " |")
    print("|" + "---|" * len(PARTS))
    print("| " + " | ".join(f"{statistics.median(runs[p]):.0f}" for p in PARTS) + " |")


if __name__ == "__main__":
    main()
