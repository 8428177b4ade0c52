"""Split-K over the tokens of a decode and the log-sum-exp merge of its splits.

A decode kernel walks each (sequence, kv head) in ``num_splits`` splits of ``split_len`` tokens
(a whole number of ``BLOCK_N`` blocks) and writes per split its normalized output ``o_s`` and
its base-2 log-sum-exp ``lse_s``; a split with no token has ``lse_s = −∞``. The merge is

    o = Σ_s 2^(lse_s − M) o_s / Σ_s 2^(lse_s − M),   M = max_s lse_s.

It walks the splits in blocks ``B`` of ``S_BLOCK`` (a fixed size: no variant per cache length)
with a running max ``M``, weight total ``l`` and weighted sum ``a``, all starting empty
(``M = −∞``, ``l = 0``, ``a = 0``):

    M' = max(M, max_{s∈B} lse_s),   l' = 2^(M − M') l + Σ_{s∈B} 2^(lse_s − M'),
    a' = 2^(M − M') a + Σ_{s∈B} 2^(lse_s − M') o_s,   and at the end o = a / l.

While ``M' = −∞`` (every split so far empty) the exponents take 0 in place of ``M'``, since
``−∞ − (−∞)`` is NaN.

Splits are sized from a capacity (``max_pages · P`` tokens), not from the lengths, so a
launcher never waits for the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["LOG2E", "merge_kernel", "merge_two_domains_kernel", "num_splits", "split_length"]

LOG2E = 1.4426950408889634  # 1/ln 2: e^x = 2^(x·log2 e)


def num_splits(batch_heads: int, capacity: int, block_n: int, device: torch.device,
               per_sm: int = 4) -> int:
    """Splits per (sequence, kv head): about ``per_sm`` programs per multiprocessor, at least
    one block of tokens per split."""
    sms = (torch.cuda.get_device_properties(device).multi_processor_count
           if device.type == "cuda" else 4)
    return max(1, min(triton.cdiv(per_sm * sms, batch_heads), triton.cdiv(capacity, block_n)))


def split_length(capacity: int, splits: int, block_n: int) -> int:
    """Tokens per split: ``capacity / splits`` rounded up to whole ``block_n`` blocks."""
    return triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n


@triton.jit
def _block(o_part, lse_part, i_row, s0, num_splits, b_m, D: tl.constexpr,
           S_BLOCK: tl.constexpr):
    """Splits ``s0 … s0 + S_BLOCK − 1`` of row ``i_row``: their outputs ``[S_BLOCK, D]``, the
    new running max ``M' = max(M, max lse_s)``, ``α = 2^(M − M')`` and ``w_s = 2^(lse_s − M')``
    (0 past ``num_splits``). While ``M' = −∞`` (every split so far empty) 0 stands for ``M'``,
    as ``−∞ − (−∞)`` is NaN: then ``α = w_s = 0``."""
    o_s = s0 + tl.arange(0, S_BLOCK)
    m_s = o_s < num_splits
    b_lse = tl.load(lse_part + i_row * num_splits + o_s, mask=m_s, other=float("-inf"))
    b_o = tl.load(o_part + (i_row * num_splits + o_s[:, None]) * D + tl.arange(0, D)[None, :],
                  mask=m_s[:, None], other=0.0)
    b_m_new = tl.maximum(b_m, tl.max(b_lse, 0))
    b_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
    return b_o, b_m_new, tl.exp2(b_m - b_ref), tl.exp2(b_lse - b_ref)


# num_splits follows the cache's length: specialised on, it would compile a variant per
# "divisible by 16" flip as the cache grows
@triton.jit(do_not_specialize=["num_splits"])
def merge_kernel(o_part, lse_part, out, num_splits, stride_ob, stride_oh,
                 HQ: tl.constexpr, D: tl.constexpr, S_BLOCK: tl.constexpr = 32):
    """One program per output row (sequence, query head): partials ``[rows, num_splits, D]``
    and ``[rows, num_splits]``; ``out[b, h]`` at strides ``stride_ob``, ``stride_oh``. A row
    needs one split with a token (a row with none would be 0/0)."""
    i_row = tl.program_id(0)
    i_b, i_h = i_row // HQ, i_row % HQ
    o_d = tl.arange(0, D)
    b_m = tl.full([], float("-inf"), tl.float32)  # M: max lse so far
    b_l = tl.zeros([], tl.float32)  # Σ 2^(lse_s − M)
    b_acc = tl.zeros([D], tl.float32)  # Σ 2^(lse_s − M) o_s
    for s0 in range(0, num_splits, S_BLOCK):
        b_o, b_m, b_alpha, b_w = _block(o_part, lse_part, i_row, s0, num_splits, b_m, D,
                                        S_BLOCK)
        b_l = b_l * b_alpha + tl.sum(b_w, 0)
        b_acc = b_acc * b_alpha + tl.sum(b_w[:, None] * b_o, 0)
    tl.store(out + i_b * stride_ob + i_h * stride_oh + o_d, (b_acc / b_l).to(out.dtype.element_ty))


@triton.jit(do_not_specialize=["num_splits"])
def merge_two_domains_kernel(o_part, lse_part, rotated, out, num_splits, D: tl.constexpr,
                             S_BLOCK: tl.constexpr = 32):
    """The merge with splits in two value domains (``rotated[s]`` 0 or 1), summed apart:
    ``out[row] = (Σ_plain w_s o_s, Σ_rotated w_s o_s) / Σ_s w_s``, ``out`` ``[rows, 2, D]``;
    a row with no token at all gets 0."""
    i_row = tl.program_id(0)
    o_d = tl.arange(0, D)
    b_m = tl.full([], float("-inf"), tl.float32)  # M: max lse so far
    b_l = tl.zeros([], tl.float32)  # Σ 2^(lse_s − M)
    b_accp = tl.zeros([D], tl.float32)  # Σ_plain 2^(lse_s − M) o_s
    b_accr = tl.zeros([D], tl.float32)  # Σ_rotated 2^(lse_s − M) o_s
    for s0 in range(0, num_splits, S_BLOCK):
        b_o, b_m, b_alpha, b_w = _block(o_part, lse_part, i_row, s0, num_splits, b_m, D,
                                        S_BLOCK)
        o_s = s0 + tl.arange(0, S_BLOCK)
        b_rot = tl.load(rotated + o_s, mask=o_s < num_splits, other=0)
        b_wp = tl.where(b_rot == 0, b_w, 0.0)
        b_wr = tl.where(b_rot == 1, b_w, 0.0)
        b_l = b_l * b_alpha + tl.sum(b_w, 0)
        b_accp = b_accp * b_alpha + tl.sum(b_wp[:, None] * b_o, 0)
        b_accr = b_accr * b_alpha + tl.sum(b_wr[:, None] * b_o, 0)
    # a row with no token leaves Σ w = 0 and sums 0: it gets 0
    b_inv = tl.where(b_l > 0, 1.0 / tl.where(b_l > 0, b_l, 1.0), 0.0)
    tl.store(out + i_row * 2 * D + o_d, b_accp * b_inv)
    tl.store(out + i_row * 2 * D + D + o_d, b_accr * b_inv)
