"""Decode attention over mixed-tier pages plus the fp16 window.

``ada_decode`` is the Triton kernel (every tier of the default and ADA ladders read from its
codes, GQA, split-K over pages with a log-sum-exp merge, every segment of a layer in one
launch); :class:`AdaDecodePlan` its per-step plan; ``ada_decode_naive`` the plain-torch
definition over the codecs' ``decode``. :class:`TierPages` and :class:`Window` describe what
they read.
"""

from sphkv.kernels.ada_decode.decode import MAX_ROWS, AdaDecodePlan, ada_decode
from sphkv.kernels.ada_decode.naive import TierPages, Window, ada_decode_naive

__all__ = ["MAX_ROWS", "AdaDecodePlan", "TierPages", "Window", "ada_decode", "ada_decode_naive"]
