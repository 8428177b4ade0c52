"""Decode attention over pages of one TurboQuant tier of the default ladder.

``quant_decode`` is the Triton kernel (rotate q once, logits and values from the codes in
registers, GQA, split-K with log-sum-exp merge); ``quant_decode_naive`` the plain-torch
definition over the codecs' ``decode``.
"""

from sphkv.kernels.quant_decode.decode import quant_decode
from sphkv.kernels.quant_decode.naive import quant_decode_naive

__all__ = ["quant_decode", "quant_decode_naive"]
