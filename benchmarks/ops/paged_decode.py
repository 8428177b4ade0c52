"""Dense fp16 paged decode (Triton) against torch SDPA fp16 on a GPU.

``python -m benchmarks.run --op paged_decode [--batch 8] [--lengths 8192 32768] [--page-size 16]``

For each shape (query heads / kv heads / head dim) and length L: fresh Gaussian q, K, V; the
paged cache scatters each sequence's pages through the pool in random order. Correctness
first: the kernel against ``paged_decode_naive`` with ragged lengths (relative error printed);
then every sequence at length L is timed with ``triton.testing.do_bench`` (median; it clears
the L2 cache before each run) for a few launch configurations of the kernel, and for SDPA
(``enable_gqa=True``) on dense ``[B, H, L, D]`` K/V under each backend that runs.

Columns: ``bytes_MB`` is what the attention must read and write at least (K and V once, q, the
output; the block table for the paged kernel); ``floor_us`` those bytes at the measured copy
bandwidth; ``flop_us`` the 4·B·Hq·L·D operations at the measured fp16 matmul rate (the
larger of the two is the floor); ``pct_copy`` achieved GB/s over the copy bandwidth.
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F

from benchmarks.common import gbps
from sphkv.kernels.paged_decode import paged_decode, paged_decode_naive

SHAPES = {"32q/8kv/d128": (32, 8, 128), "9q/3kv/d64": (9, 3, 64)}
# (block_n, num_warps, num_stages, programs per multiprocessor) tried for the Triton kernel;
# the first is the default (None: the launcher's 4 programs per multiprocessor)
CONFIGS = [(64, 4, 2, None), (32, 4, 2, None), (64, 4, 3, None), (128, 4, 2, None),
           (128, 8, 2, None), (64, 8, 3, None), (64, 4, 2, 8), (64, 4, 2, 2)]
BACKENDS = ["FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)


def time_op(fn) -> float:
    """Median seconds of ``fn`` (compiled and warmed first)."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3


def device_ceilings() -> tuple[float, float]:
    """Measured device-to-device copy bandwidth (bytes read + written, per second) and fp16
    matmul rate (FLOP per second)."""
    src = torch.randn(2**29, device="cuda", dtype=torch.float16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_bw = 2 * src.numel() * 2 / time_op(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    flops = 2 * 8192**3 / time_op(lambda: a @ b)
    return copy_bw, flops


def paged_case(B, Hq, Hkv, D, L, P, gen):
    max_pages = (L + P - 1) // P
    num_pages = B * max_pages
    q = torch.randn(B, Hq, D, generator=gen, device="cuda").half()
    k = torch.randn(num_pages, P, Hkv, D, generator=gen, device="cuda").half()
    v = torch.randn(num_pages, P, Hkv, D, generator=gen, device="cuda").half()
    block_table = torch.randperm(num_pages, generator=gen, device="cuda").int().view(B, max_pages)
    return q, k, v, block_table


def _triton(q, k, v, bt, lengths) -> list[tuple[float, str]]:
    """Seconds of each launch configuration."""
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    bh = q.shape[0] * k.shape[2]
    timed = []
    for block_n, warps, stages, per_sm in CONFIGS:
        splits = None if per_sm is None else -(-per_sm * sms // bh)
        fn = functools.partial(paged_decode, q, k, v, bt, lengths, block_n=block_n,
                               num_warps=warps, num_stages=stages, num_splits=splits)
        label = f"triton bn{block_n} w{warps} s{stages}" + ("" if per_sm is None else
                                                             f" {per_sm}/SM")
        timed.append((time_op(fn), label))
    return timed


def time_sdpa(qd, kd, vd, label: str) -> list[tuple[float, str]]:
    """Seconds of SDPA under each backend that accepts the shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    timed = []
    for backend in BACKENDS:
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                t = time_op(lambda: F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True))
        except RuntimeError as err:  # the backend refuses this shape or is not built
            print(f"SDPA {backend} {label}: not run ({str(err).splitlines()[0]})")
            continue
        timed.append((t, f"sdpa {backend.split('_')[0].lower()}"))
    return timed


def _measure(name: str, B: int, L: int, P: int, gen, copy_bw: float,
             flop_rate: float) -> list[dict]:
    Hq, Hkv, D = SHAPES[name]
    q, k, v, bt = paged_case(B, Hq, Hkv, D, L, P, gen)
    # correctness at this size first, with ragged lengths; NaN fails the comparison
    ragged = torch.randint(1, L + 1, (B,), generator=gen, device="cuda").int()
    ragged[0] = L
    ref = paged_decode_naive(q, k, v, bt, ragged).double()
    out = paged_decode(q, k, v, bt, ragged).double()
    rel_err = ((out - ref).norm() / ref.norm()).item()
    assert not out.isnan().any() and rel_err < 2e-3, f"{name} L={L}: error {rel_err}"
    del ref, out

    io_bytes = 2 * B * L * Hkv * D * 2 + 2 * B * Hq * D * 2  # K and V once; q and output
    base = {"shape": name, "B": B, "L": L, "bytes_MB": io_bytes / 1e6,
            "floor_us": io_bytes / copy_bw * 1e6,
            "flop_us": 4 * B * Hq * L * D / flop_rate * 1e6}
    lengths = torch.full((B,), L, device="cuda", dtype=torch.int32)
    timed = [(t, impl, io_bytes + bt.numel() * 4) for t, impl in _triton(q, k, v, bt, lengths)]
    del q, k, v, bt
    qd = torch.randn(B, Hq, 1, D, generator=gen, device="cuda").half()
    kd = torch.randn(B, Hkv, L, D, generator=gen, device="cuda").half()
    vd = torch.randn(B, Hkv, L, D, generator=gen, device="cuda").half()
    timed += [(t, impl, io_bytes) for t, impl in time_sdpa(qd, kd, vd, f"{name} L={L}")]
    sdpa_best = min((t for t, impl, _ in timed if impl.startswith("sdpa")), default=float("nan"))
    return [{**base, "impl": impl, "us": t * 1e6, "GB_s": gbps(nbytes, t),
             "pct_copy": 100 * nbytes / t / copy_bw, "speedup_vs_sdpa": sdpa_best / t,
             "rel_err": rel_err if impl.startswith("triton") else None}
            for t, impl, nbytes in timed]


def run(args: argparse.Namespace) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    copy_bw, flop_rate = device_ceilings()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s, fp16 matmul {flop_rate / 1e12:.0f} TFLOP/s")
    rows = []
    for name in args.shapes:
        for L in args.lengths:
            rows += _measure(name, args.batch, L, args.page_size, gen, copy_bw, flop_rate)
            torch.cuda.empty_cache()
    for r in rows:
        r["copy_GB_s"] = copy_bw / 1e9
        r["matmul_TFLOP_s"] = flop_rate / 1e12
    return rows


def summarize(rows: list[dict]) -> str:
    """Per shape and length: the default and the best Triton configuration, the best SDPA."""
    from benchmarks.common import format_table

    out = []
    for key in dict.fromkeys((r["shape"], r["L"]) for r in rows):
        group = [r for r in rows if (r["shape"], r["L"]) == key]
        tri = [r for r in group if r["impl"].startswith("triton")]
        sdpa = [r for r in group if r["impl"].startswith("sdpa")]
        picks = [("triton default", tri[0]), ("triton best", min(tri, key=lambda r: r["us"]))]
        if sdpa:
            picks.append(("sdpa best", min(sdpa, key=lambda r: r["us"])))
        for label, r in picks:
            out.append({"shape": r["shape"], "L": r["L"], "which": label, "impl": r["impl"],
                        "us": r["us"], "GB_s": r["GB_s"], "pct_copy": r["pct_copy"],
                        "floor_us": r["floor_us"], "flop_us": r["flop_us"],
                        "speedup_vs_sdpa": r["speedup_vs_sdpa"]})
    return format_table(out)
