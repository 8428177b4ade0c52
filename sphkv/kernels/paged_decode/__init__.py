"""Dense paged decode attention over an fp16 KV cache: the in-house baseline.

``paged_decode`` is the Triton kernel (GQA, split-K over pages, log-sum-exp merge);
``paged_decode_naive`` the plain-torch definition it is tested against.
"""

from sphkv.kernels.paged_decode.decode import paged_decode
from sphkv.kernels.paged_decode.naive import paged_decode_naive

__all__ = ["paged_decode", "paged_decode_naive"]
