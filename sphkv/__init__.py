"""sphkv: a rate-distortion toolkit for the KV cache of transformer language models.

Subpackages: ``rdr`` (the allocation problem, tiers, utilities, pages), ``codec`` (key and value
codecs), ``kernels`` (Triton kernels with torch references), ``solvers`` (greedy, LP, ILP),
``analysis`` (distortion bounds, rate-distortion curves, plots).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
