"""Encode + pack of new tokens' keys or values into pool slots.

``encode_pack`` is the Triton kernel (TurboQuant tiers: rotation as a matmul, norm, Lloyd–Max
bucketing, bit packing; int8 and fp16); ``encode_pack_naive`` the plain-torch definition (the
codec's ``encode``, then the rows written into the slots). ``encode_codes`` is ``encode`` by the
kernel, for the codecs of ``KERNEL_CODECS`` (what :class:`~sphkv.integrations.hf.SphkvCache`
calls on a GPU).
"""

from sphkv.kernels.encode_pack.encode import KERNEL_CODECS, encode_codes, encode_pack
from sphkv.kernels.encode_pack.naive import encode_pack_naive

__all__ = ["KERNEL_CODECS", "encode_codes", "encode_pack", "encode_pack_naive"]
