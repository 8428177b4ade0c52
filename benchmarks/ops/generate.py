"""Generation through the compressed cache against plain ``model.generate``.

A model with random weights and real layer shapes (``--shapes``; or a real model by name with
``--model``) generates ``--new-tokens`` tokens greedily after a random prompt of each
``--contexts`` length, for each batch size, once plainly (``DynamicCache``; on a GPU, SDPA
restricted to its flash and memory-efficient kernels, whose cost does not depend on building a
plan per KV length) and once per method and budget through :class:`SphkvCache`
(:func:`~sphkv.integrations.hf.compressed_generate`; the kernel path on a GPU). Before its
first row of each batch size and window, a method generates once, untimed, from a short
prompt of that batch through a few admissions at that window, so that Triton's compilations
of its kernels (specialised on shapes the batch and window change) are not counted in any row.

Per row: ``tok_s`` (generated tokens per second over the decode steps, the prefill excluded),
``vs_plain`` (over plain generation's), the median and p99 decode step (``step_ms``,
``p99_ms``: every W-th step admits W tokens; ``steps_ms``: every step, in order),
``prefill_s`` (the prompt's forward and, for the cache, its allocation),
``allocator_share`` (seconds in admissions and revisions over decode seconds), ``admit_ms``
(median admission), ``revise_ms`` (median revision of a recalling method, ``host_bytes`` its
host copy at the end), ``graph_steps`` (decode steps replayed as a CUDA graph;
``--no-graphs`` runs every step eagerly), ``window`` (W: the cache's choice, or each of
``--windows``), ``prefill_chunk`` (``--prefill-chunk``: the prompt fed in chunks, plainly and
through the cache), ``peak_kv_bytes`` (the cache's accounted peak over
every pool write; plain: its KV tensors at the end) against ``budget_bytes``, and
``peak_device_bytes``, the most device memory allocated during the generation, weights
included (a GPU only: where the prefill's transients show). Plain generation
runs eagerly, as ``model.generate`` does with a ``DynamicCache``. Steps are timed by a
streamer that synchronizes the device after each token. The JSON is written after every row.

``python -m benchmarks.run --op generate`` (GPU: Llama-3.2-1B and 8B layer shapes, 8k and 32k
tokens); ``--device cpu --shapes smollm2 --contexts 2048 4096 --batches 1`` on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import time

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

from benchmarks.common import write_json

#: layer shapes and position ranges of real models (random weights); vocabularies cut to 32k
#: where larger (a range of 2^16 positions or more gives the cache 32-bit position offsets)
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     max_position_embeddings=131072),
    "llama-8b-layers": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                            num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                            max_position_embeddings=131072),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    max_position_embeddings=8192),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES),
                        default=["llama-1b", "llama-8b-layers"] if cuda else ["smollm2"],
                        help="random models with these layer shapes")
    parser.add_argument("--model", default=None,
                        help="a real model instead of --shapes (e.g. smollm2)")
    parser.add_argument("--contexts", type=int, nargs="+",
                        default=[8192, 32768] if cuda else [2048, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8] if cuda else [1])
    parser.add_argument("--methods", nargs="+", default=["rdr", "rdr-ada"])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.125],
                        help="budgets as shares of the fp16 cache")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="feed the prompt in chunks of this many tokens (generate's "
                             "prefill_chunk_size), plainly and through the cache; default: at "
                             "once")
    parser.add_argument("--windows", type=int, nargs="+", default=None,
                        help="the cache's window W (tokens kept fp16, admitted W at a time); "
                             "default: chosen by the cache from the budget")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="decode steps between admissions as CUDA graphs (GPU only)")


class _Clock(BaseStreamer):
    """Time after each ``put`` (the prompt, then every new token), the device synchronized."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def put(self, value) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _model(shape: str | None, name: str | None, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if name is not None:
        from sphkv.integrations.hf import load_model

        return load_model(name, dtype=dtype)[0].to(device), name
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], vocab_size=32000, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval(), shape


def _run_once(model, ids, new: int, device, cache=None,
              chunk: int | None = None) -> tuple[list[float], float, int | None]:
    """Decode step seconds, prefill seconds and the peak of the device memory allocated (the
    model's weights included; None on the CPU) of one greedy generation, the prompt fed in
    chunks of ``chunk`` tokens if given."""
    from sphkv.integrations.hf import cache_argument

    clock = _Clock(device)
    kwargs = {} if cache is None else {cache_argument(model): cache}
    if chunk is not None:
        kwargs["prefill_chunk_size"] = chunk
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       streamer=clock, pad_token_id=0, **kwargs)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    # times[0]: the prompt (before the prefill), times[1]: the first new token
    return list(np.diff(clock.times[1:])), clock.times[1] - start, peak


def _plain(model, ids, new, device, chunk) -> tuple[list[float], float, int, int | None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import DynamicCache

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    cache = DynamicCache(config=model.config)
    with sdpa_kernel(backends):
        steps, prefill, peak = _run_once(model, ids, new, device, cache, chunk)
    kv = sum(t.numel() * t.element_size() for layer in cache.layers
             for t in (layer.keys, layer.values))
    return steps, prefill, kv, peak


def run(args: argparse.Namespace) -> list[dict]:
    from sphkv.integrations.hf import SphkvCache, compressed_attention
    from sphkv.integrations.hf.generate import budget_bytes
    from sphkv.rdr import InfeasibleBudgetError

    device = torch.device(args.device)
    rows, warm = [], set()

    def add(row: dict) -> None:
        # written after every row: a grid cut short (a time limit, a crash) keeps what it measured
        rows.append(row)
        write_json("generate", rows, out_dir=args.out_dir)
    for shape in [None] if args.model else args.shapes:
        model, label = _model(shape, args.model, device)
        for context in args.contexts:
            for batch in args.batches:
                gen = torch.Generator().manual_seed(context + batch)
                ids = torch.randint(1, model.config.vocab_size, (batch, context),
                                    generator=gen).to(device)
                try:
                    steps, prefill, kv, peak = _plain(model, ids, args.new_tokens, device,
                                                      args.prefill_chunk)
                except torch.OutOfMemoryError:
                    add(dict(model=label, method="none", context=context, batch=batch,
                             budget=1.0, tok_s=None, note="out of memory"))
                    steps = None
                    torch.cuda.empty_cache()
                plain_tok_s = None
                if steps is not None:
                    plain_tok_s = batch * len(steps) / sum(steps)
                    add(_row(label, "none", context, batch, 1.0, steps, prefill, plain_tok_s,
                             [], kv, None) | {"peak_device_bytes": peak,
                                              "prefill_chunk": args.prefill_chunk})
                gc.collect()
                for method, window, fraction in itertools.product(
                        args.methods, args.windows or [None], args.fractions):
                    limit = budget_bytes(model.config, batch, context + args.new_tokens,
                                         fraction)
                    cache = SphkvCache(model.config, limit, method, window=window)
                    w = window or cache.budget_window(batch)
                    if (label, method, w, batch) not in warm:
                        _warm_up(model, method, w, batch, device, args.graphs)
                        warm.add((label, method, w, batch))
                    try:
                        with compressed_attention(model, graphs=args.graphs):
                            steps, prefill, peak = _run_once(model, ids, args.new_tokens,
                                                             device, cache, args.prefill_chunk)
                    except (torch.OutOfMemoryError, InfeasibleBudgetError) as exc:
                        note = ("out of memory" if isinstance(exc, torch.OutOfMemoryError)
                                else f"budget below the cache's minimum: {exc}")
                        add(dict(model=label, method=method, context=context, batch=batch,
                                 budget=fraction, window=window, tok_s=None, note=note))
                        del cache
                        gc.collect()
                        torch.cuda.empty_cache()
                        continue
                    admits, revisions = ([s for kind, s in cache.timings if kind == k]
                                         for k in ("admit", "revise"))
                    row = _row(label, method, context, batch, fraction, steps, prefill,
                               plain_tok_s, admits, cache.peak_bytes, limit, revisions)
                    row["host_bytes"] = cache.host_bytes()
                    graph = cache.decode_graph
                    row["graph_steps"] = graph.steps["replayed"] if graph else 0
                    row["window"] = cache.window
                    row["prefill_chunk"] = args.prefill_chunk
                    row["peak_device_bytes"] = peak
                    add(row)
                    del cache
                    gc.collect()
        del model
        gc.collect()
    return rows


def _warm_up(model, method: str, window: int, batch: int, device: torch.device,
             graphs: bool) -> None:
    """One untimed generation of ``batch`` sequences through ``method``'s cache at W =
    ``window``: a prompt of 1,024 tokens (16 W for a larger window, so that a quarter of its
    fp16 bytes holds the window's reserve), then three admissions."""
    from sphkv.integrations.hf import SphkvCache, compressed_attention
    from sphkv.integrations.hf.generate import budget_bytes

    prompt = max(1024, 16 * window)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt)).to(device)
    new = 3 * window
    cache = SphkvCache(model.config, budget_bytes(model.config, batch, prompt + new, 0.25),
                       method, window=window)
    with compressed_attention(model, graphs=graphs):
        _run_once(model, ids, new, device, cache)


def _row(model, method, context, batch, fraction, steps, prefill, plain_tok_s, admits,
         peak, budget, revisions=()) -> dict:
    ms = np.asarray(steps) * 1e3
    tok_s = batch * len(steps) / sum(steps)
    return dict(model=model, method=method, context=context, batch=batch, budget=fraction,
                tok_s=tok_s, vs_plain=None if plain_tok_s is None else tok_s / plain_tok_s,
                step_ms=float(np.median(ms)), p99_ms=float(np.percentile(ms, 99)),
                steps_ms=[round(float(x), 3) for x in ms],
                prefill_s=prefill,
                allocator_share=((sum(admits) + sum(revisions)) / sum(steps)
                                 if budget is not None else None),
                admit_ms=float(np.median(admits) * 1e3) if admits else None,
                revise_ms=float(np.median(revisions) * 1e3) if revisions else None,
                peak_kv_bytes=int(peak), budget_bytes=None if budget is None else int(budget))
