"""Codec throughput on the CPU: encode and logits-from-codes over N keys.

``python -m benchmarks.run --op codecs [--n 1000000] [--dims 64 128] [--codecs ada3 turbo3 ...]``

Keys and queries are fresh Gaussian data. Encode runs over chunks of keys (the codes of all N
keys are kept); logits then reads every chunk's codes for ``--queries`` query rows (a GQA group
at decode time). GB/s counts the code bytes read by logits (payload and side information).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import gbps
from sphkv.codec import (
    Codec,
    FibQuantCodec,
    Fp16Codec,
    HypersphericalCodec,
    Int8Codec,
    KiviCodec,
    PolarQuantCodec,
    SphericalCodec,
    TurboQuantCodec,
)

# name -> codec for head dimension d
CODECS = {
    "ada2": lambda d: SphericalCodec.for_rate(d, 2.25),
    "ada3": lambda d: SphericalCodec.for_rate(d, 3.25),
    "ada4": lambda d: SphericalCodec.for_rate(d, 4.25),
    "hyper3": lambda d: HypersphericalCodec(d=d, bits=3),
    "turbo3": lambda d: TurboQuantCodec(d=d, bits=3),
    "kivi2": lambda d: KiviCodec(d=d, bits=2),
    "polar4+4": lambda d: PolarQuantCodec(d=d),
    "fib8+2": lambda d: FibQuantCodec(d=d),
    "int8": lambda d: Int8Codec(d=d),
    "fp16": lambda d: Fp16Codec(d=d),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=1_000_000, help="keys per codec")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="head dims")
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    parser.add_argument("--queries", type=int, default=3, help="query rows per logits call")
    parser.add_argument("--chunk", type=int, default=65536, help="keys per encode call")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)


def _time(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _bench(codec: Codec, keys: torch.Tensor, q: torch.Tensor, chunk: int) -> dict:
    codec.logits(q, codec.encode(keys[:chunk]))  # warm-up: codebooks, allocator
    t_enc, codes = _time(lambda: [codec.encode(keys[i:i + chunk])
                                  for i in range(0, keys.shape[0], chunk)])
    t_log, _ = _time(lambda: [codec.logits(q, c) for c in codes])
    n = keys.shape[0]
    nbytes = sum(c.nbytes for c in codes)
    return {"bits_per_coord": codec.bits_per_coordinate, "bytes_per_key": codec.bytes_per_vector,
            "encode_s": t_enc, "encode_Mkeys_s": n / t_enc / 1e6,
            "logits_s": t_log, "logits_Mkeys_s": n / t_log / 1e6,
            "logits_GB_s": gbps(nbytes, t_log)}


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for d in args.dims:
        keys = torch.randn(args.n, d, generator=gen)
        q = torch.randn(args.queries, d, generator=gen)
        for name in args.codecs:
            codec = CODECS[name](d)
            rows.append({"codec": name, "d": d, "n": args.n, "queries": args.queries,
                         "threads": torch.get_num_threads(),
                         **_bench(codec, keys, q, args.chunk)})
    return rows
