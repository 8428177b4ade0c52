"""Compression methods: what the online allocator (:mod:`sphkv.rdr.online`) stores and how
it weighs it.

A :class:`Method` owns its behaviour, in the manner of kvpress's presses: its tier ladder (and
the tiers of it that it may use), its distortion rows (:meth:`Method.distortion`: the measured
or estimated attention weights, the prior floor, the per-layer scale) and its no-drop rule. Any
utility estimator composes with any ladder (``dataclasses.replace(METHODS["rdr"],
estimator="keydiff")``), so RDR, drop-only and quantize-only methods share one allocator at
equal bytes. :data:`METHODS` is the registry by name:

- RDR (drop allowed; weights: the measured attention of the last 64 prompt queries mixed
  half and half with a uniform prior (``floor=0.5``); distortion relative to each layer's
  output energy (``relative``); docs/evaluation.md has the experiments): ``rdr``
  (:func:`~sphkv.rdr.tiers.default_tiers`), ``rdr-ada`` (:func:`~sphkv.rdr.tiers.ada_tiers`),
  ``rdr-scalar`` (:func:`~sphkv.rdr.tiers.scalar_tiers`: int2, int4, int8, fp16), ``rdr-kv``
  (:func:`~sphkv.rdr.tiers.kv_tiers`), ``rdr-fast`` (:func:`~sphkv.rdr.tiers.fast_tiers`:
  evenly spaced 2- and 4-bit levels, decoded faster on a GPU).
- Drop-only (fp16 or drop), tokens ranked by an estimator of :mod:`sphkv.rdr.utility`:
  ``streamingllm`` (recency, arXiv 2309.17453), ``snapkv`` (window attention,
  arXiv 2404.14469), ``h2o`` (accumulated attention, Zhang et al., "H2O: Heavy-Hitter Oracle
  for Efficient Generative Inference of Large Language Models", arXiv 2306.14048), ``keydiff``
  (arXiv 2504.15364), ``manifoldkv`` and ``manifoldkv-windowed`` (Euclidean distance to the
  global or a local key centroid; Datta et al., "ManifoldKV: Training-Free KV Cache Compression
  via Euclidean Outlier Detection", arXiv 2602.08343).
- Quantize-only (drop only when nothing else holds the budget): ``kivi`` (arXiv 2402.02750),
  ``turboquant`` (arXiv 2504.19874), ``polarquant`` (arXiv 2502.00527) and ``fibquant``
  (arXiv 2605.11478); each ladder's docstring says what it stores.

What the allocator imposes on every method, where the papers differ: the first ``sinks`` tokens
take the method's dearest tier (``rdr-kv-sinks``: any tier but drop,
:attr:`Method.chosen_sinks`; ``rdr-kv-recall-centred-sinks``: int8 or fp16,
:attr:`Method.sink_floor`) and the last W to 2W tokens stay fp16 (the window, reserved from
the budget); after prefill one greedy solve over all layers and heads picks the tiers from the
distortion weighted by the estimator's ranking (:mod:`sphkv.rdr.distortion`), not a per-head
top-k of the scores, so heads and layers share the budget; during decoding, tokens leaving the
window are admitted W at a time at the current price, and a token's distortion is fixed when it
is admitted. For ``h2o`` this means: the window stands for H2O's recent tokens and the rest of
the budget for its heavy hitters (H2O splits its budget in half), and the accumulated scores
stop growing once a token is admitted (H2O keeps adding every decoding step's attention); the
estimator asks for every prefill query (:attr:`~sphkv.rdr.utility.Estimator.all_queries`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sphkv.codec import FibQuantCodec, KiviCodec, PolarQuantCodec
from sphkv.rdr.distortion import layer_distortion
from sphkv.rdr.tiers import (
    KV_PAIRS,
    Tier,
    TierSet,
    ada_tiers,
    default_tiers,
    fast_tiers,
    kv_tiers,
    scalar_tiers,
)
from sphkv.rdr.utility import Estimator, get_estimator

__all__ = ["METHODS", "NO_DROP_PENALTY", "Method", "Recency", "get_method"]

#: a method that never drops prices a drop at this multiple of the largest distortion of the
#: same items, so that dropping happens only when no other assignment holds the budget
NO_DROP_PENALTY = 1e6


@dataclass
class Recency(Estimator):
    """Recency: later tokens are more useful (with the sinks, StreamingLLM's rule).

    Based on Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
    arXiv 2309.17453.
    """

    def _score(self, keys, values, queries):
        return torch.arange(keys.shape[1], dtype=torch.float32,
                            device=keys.device).expand(keys.shape[0], -1)


def _kivi_tiers(d: int, page_size: int = 16) -> TierSet:
    """drop → kivi2 → kivi4: KIVI's asymmetric int-b, keys per channel and values per token.

    Keys: one fp16 scale and zero point per channel over each page of a head's tokens
    (:class:`KiviCodec` with ``axis="channel"`` and ``group_size=page_size``; the paged store
    quantizes each page whole). KIVI groups 32 tokens and keeps the newest ones fp16 until a
    group fills; here a group is a page, the cache's fp16 window holds the newest tokens, and a
    page that gains or loses tokens is quantized again from its decoded keys. Values: one scale
    and zero point per 32 channels of each token. Bytes per token-head at d = 64 and 16-token
    pages (with the 2-byte slot offset): 58 and 90 (fp16: 256); 16 of them are the key
    statistics.

    Based on Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache",
    arXiv 2402.02750.
    """
    def kivi(bits: int) -> Tier:
        return Tier(f"kivi{bits}", KiviCodec(d=d, bits=bits, group_size=page_size,
                                             axis="channel"),
                    KiviCodec(d=d, bits=bits, group_size=math.gcd(d, 32), axis="token"))

    return TierSet((Tier("drop"), kivi(2), kivi(4)))


def _polar_tiers(d: int) -> TierSet:
    """drop → polar2 → polar3 → polar4: PolarQuant-style keys, KIVI-style values, b = 2, 3, 4.

    Keys: each RoPE pair as a radius and an angle (:class:`PolarQuantCodec`), 2b bits per pair
    split (1, 3), (2, 4), (3, 5) between radius and angle (angle bits matter more: of the splits
    tried, these give the lowest attention error on SmolLM2 at each b). The paper quantizes the
    key cache only; values take KIVI's per-token groupwise int-b (32 channels per fp16 scale and
    zero). The paper quantizes per channel, with ranges over a group of tokens, which pages of
    single tokens do not have: the codec scales radii per vector and codes angles on the whole
    circle. Bytes per token-head at d = 64: 0, 44, 60, 76 (fp16: 256).

    Based on Wu et al., "PolarQuant: Leveraging Polar Transformation for Efficient Key Cache
    Quantization and Decoding Acceleration", arXiv 2502.00527 (not Han et al.'s PolarQuant,
    arXiv 2502.02617, whose recursive polar transform is the ADA codec of ``rdr-ada``).
    """
    def polar(bits: int) -> Tier:
        g = math.gcd(d, 32)
        key = PolarQuantCodec(d=d, radius_bits=bits - 1, angle_bits=bits + 1)
        return Tier(f"polar{bits}", key, KiviCodec(d=d, bits=bits, group_size=g, axis="token"))

    return TierSet((Tier("drop"), polar(2), polar(3), polar(4)))


def _fib_tiers(d: int) -> TierSet:
    """drop → fib2 → fib3 → fib4: FibQuant-style keys and values at b = 2, 3, 4 bits.

    Both keys and values, as in the paper: rotation, fp16 norm, and per block of k coordinates
    a Beta-quantile radius code and a quasi-uniform direction code (:class:`FibQuantCodec`).
    b = 2 and 3 use k = 4 with (direction, radius) bits (7, 1) and (9, 3); b = 4 uses k = 2 with
    (5, 3), whose attention error on SmolLM2 is lower than k = 4's with (10, 6) or (9, 7) (a
    2^12-word codebook, (12, 4), takes gigabytes to build here). Bytes per token-head at
    d = 64: 0, 36, 52, 68 (fp16: 256), those of ``turbo2``–``turbo4``.

    Based on Lee and Kim, "FibQuant: Universal Vector Quantization for Random-Access KV-Cache
    Compression", arXiv 2605.11478.
    """
    def fib(name: str, block: int, direction_bits: int, radius_bits: int) -> Tier:
        codec = FibQuantCodec(d=d, block=block, direction_bits=direction_bits,
                              radius_bits=radius_bits)
        return Tier(name, codec, codec)

    return TierSet((Tier("drop"), fib("fib2", 4, 7, 1), fib("fib3", 4, 9, 3),
                    fib("fib4", 2, 5, 3)))


@dataclass(frozen=True)
class Method:
    """A compression method: a tier ladder, the tiers it may use, and a utility estimator.

    Parameters
    ----------
    name : str
    ladder : callable
        ``ladder(d) -> TierSet`` (drop first), or ``ladder(d, page_size)`` with
        ``paged_keys``.
    tiers : tuple of str, optional
        The tiers allocations may choose; all of the ladder when omitted. The first attention
        sinks take the dearest of them, unless ``chosen_sinks``.
    estimator : str or Estimator, optional
        Utility estimator whose ranking weights the distortion; the measured attention of the
        observation window when omitted.
    drop : bool
        Whether the method drops tokens; if not, drop is only the last resort that holds the
        budget.
    observation : int, optional
        Prompt queries whose measured attention weighs the prefill allocation (the cache's
        window when omitted). RDR reads 64, chosen on the tuning text (docs/experiments.md):
        at an eighth of the bytes 128 and 256 did worse at 2k tokens, 16 and 32 as well or
        better at 2k but 16 worse at 4k. The last queries predict the next ones' attention
        better than a longer history.
    floor : float
        Weight of the uniform prior mixed into the observed attention
        (:func:`~sphkv.rdr.distortion.layer_distortion`), so that tokens no observed query
        reads still cost something to drop.
    prior : str
        What the floor mixes in: ``"uniform"`` or ``"expected"`` (the expected attention of
        Gaussian future queries, :func:`~sphkv.rdr.distortion.layer_distortion`).
    relative : bool
        Weigh each layer's distortion relative to its output energy
        (:func:`~sphkv.rdr.distortion.layer_distortion`), so that the one allocation over all
        layers does not favour the layers with the largest outputs.
    paged_keys : bool
        The ladder's keys are quantized per page (KIVI's per channel): it takes the cache's
        page size.
    sensitive : bool
        Weigh each query head's output error by the head's sensitivity (the cache's
        ``head_weights``, :func:`sphkv.integrations.hf.sensitivity.head_sensitivity`) instead
        of ``relative``: the distortion becomes the loss's second-order change.
    chosen_sinks : bool
        The attention sinks' tiers are chosen by their distortion like any other token's, with
        a floor: they are never dropped (the drop column of their rows is
        :data:`NO_DROP_PENALTY` times the largest distortion of the other tiers). Otherwise
        they take the dearest tier, a page of it per (sequence, layer, kv-head).
    sink_floor : str, optional
        With ``chosen_sinks``, the cheapest tier a sink may take: the columns of its rows
        below it are priced out as drop's is. Any tier but drop when omitted.
    exact : bool
        Quantized distortion rows exact for one item instead of first order in its logit
        error (:func:`~sphkv.rdr.distortion.layer_distortion`).
    centred : bool
        Store each (sequence, layer, kv-head)'s keys and values as offsets from their means
        over the prompt (``CompressedLayer.centre`` in the cache): a codec's error scales
        with the norm of what it encodes, and attention gives the same output, since
        ``softmax(q·(k − μ_k))`` is ``softmax(q·k)`` and, the weights summing to 1,
        ``Σ p (v − μ_v) + μ_v`` is ``Σ p v``. Needs an estimator those shifts leave alone:
        the measured attention with the uniform prior.
    scaled : bool
        With ``centred``, also scale the key offsets per channel by
        ``D = (E q_c² / E k_c²)^¼`` (observed queries, prompt keys) and read queries as
        ``q / D``: logits are unchanged, and an isotropic codec error ``δ`` on ``D k`` moves a
        logit by ``(q / D)·δ``, whose mean square over queries and keys is least for this
        diagonal ``D`` (Cauchy–Schwarz on ``Σ_c D_c² E k_c² · Σ_c E q_c² / D_c²``).
    recall : int
        Every ``recall`` tokens (0: never), solve the allocation again over every token that
        left the window, weighed by the last ``observation`` queries, from an fp16 copy of
        them in host memory (the cache's ``host_bytes``, outside the budget): dropped tokens
        come back and compressed ones rise where the new queries read them. Tiers decided
        once from the prompt's queries serve the first tokens after it well and later ones
        less (docs/experiments.md).
    """

    name: str
    ladder: Callable[[int], TierSet] = default_tiers
    tiers: tuple[str, ...] | None = None
    estimator: str | Estimator | None = None
    drop: bool = True
    observation: int | None = None
    floor: float = 0.0
    relative: bool = False
    paged_keys: bool = False
    prior: str = "uniform"
    sensitive: bool = False
    chosen_sinks: bool = False
    sink_floor: str | None = None
    exact: bool = False
    centred: bool = False
    scaled: bool = False
    recall: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.recall, bool) or not isinstance(self.recall, int) or self.recall < 0:
            raise ValueError(f"method {self.name!r}: recall must be an integer >= 0 tokens, got "
                             f"{self.recall!r}")
        if self.centred and (self.estimator is not None or self.prior != "uniform"):
            raise ValueError(f"method {self.name!r}: centred needs the measured attention and "
                             f"the uniform prior (a shift of the keys moves other estimates)")
        if self.sink_floor is not None and not self.chosen_sinks:
            raise ValueError(f"method {self.name!r}: sink_floor needs chosen_sinks (otherwise "
                             f"the sinks take the dearest tier)")
        if self.scaled and not self.centred:
            raise ValueError(f"method {self.name!r}: scaled needs centred (the scales are "
                             f"those of the key offsets)")

    def tier_set(self, d: int, page_size: int = 16) -> TierSet:
        """The ladder restricted to the method's tiers, drop always first, for head dimension
        ``d`` and pages of ``page_size`` slots."""
        full = self.ladder(d, page_size) if self.paged_keys else self.ladder(d)
        names = self.tiers or tuple(full.names)
        return TierSet(tuple(t for t in full if t.is_drop or t.name in names))

    def get_estimator(self) -> Estimator | None:
        if isinstance(self.estimator, str):
            return get_estimator(self.estimator)
        return self.estimator

    @property
    def all_queries(self) -> bool:
        """Whether the estimator scores with every prefill query (H2O), not the observation."""
        return bool(getattr(self.get_estimator(), "all_queries", False))

    def distortion(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor,
                   tiers: TierSet, first: torch.Tensor | None = None,
                   score_queries: torch.Tensor | None = None, blocks: int = 1,
                   head_weights: torch.Tensor | None = None,
                   value_mean: torch.Tensor | None = None) -> np.ndarray:
        """The method's distortion rows ``D[h, i, t]`` of one layer, float64 ``[H_kv, n, T]``.

        :func:`~sphkv.rdr.distortion.layer_distortion` with the method's estimator, floor and
        scale; under the no-drop rule (``drop=False``) the drop column is
        :data:`NO_DROP_PENALTY` times the largest distortion of the other tiers.

        Parameters
        ----------
        keys, values : torch.Tensor
            ``[H_kv, n, d]``.
        queries : torch.Tensor
            ``[H_q, W, d]``, the queries of the last W of the n positions.
        tiers : TierSet
            The ladder (:meth:`tier_set`).
        first : torch.Tensor, optional
            int ``[W]``: the lowest token index each query sees (sliding and chunked layers).
        score_queries : torch.Tensor, optional
            ``[H_q, m, d]``, what the estimator scores with (:attr:`all_queries`).
        blocks : int
            The heads are this many independent layers (or sequences) of equal shape, stacked
            (:func:`~sphkv.rdr.distortion.layer_distortion`).
        head_weights : torch.Tensor, optional
            ``[H_q]``, each query head's sensitivity; required by a ``sensitive`` method and
            refused by the others.
        value_mean : torch.Tensor, optional
            ``[H_kv, d]``, the means ``values`` are offsets from (a ``centred`` method's).
        """
        if self.sensitive != (head_weights is not None):
            raise ValueError(f"method {self.name!r} " + (
                "weighs heads by their sensitivity: pass head_weights" if self.sensitive
                else "does not weigh heads: head_weights must be None"))
        d = layer_distortion(keys, values, queries, tiers, self.get_estimator(), score_queries,
                             self.floor, self.relative, first=first, blocks=blocks,
                             prior=self.prior, head_weights=head_weights, exact=self.exact,
                             value_mean=value_mean)
        if not self.drop and d.shape[1]:
            top = d[..., 1:].reshape(blocks, -1).max(axis=1).clip(min=1e-30)
            d[..., 0] = NO_DROP_PENALTY * np.repeat(top, d.shape[0] // blocks)[:, None]
        return d


#: name -> method; every method runs through :class:`SphkvCache`
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("rdr", observation=64, floor=0.5, relative=True),
    Method("rdr-ada", ladder=ada_tiers, observation=64, floor=0.5, relative=True),
    Method("rdr-scalar", ladder=scalar_tiers, observation=64, floor=0.5, relative=True),
    Method("rdr-kv", ladder=kv_tiers, observation=64, floor=0.5, relative=True),
    Method("rdr-fast", ladder=fast_tiers, observation=64, floor=0.5, relative=True),
    Method("rdr-kv-fisher", ladder=kv_tiers, observation=64, floor=0.5, sensitive=True),
    Method("rdr-kv-unbiased", ladder=functools.partial(kv_tiers, unbiased=True),
           observation=64, floor=0.5, relative=True),
    Method("rdr-kv-ea", ladder=kv_tiers, observation=64, floor=0.5, relative=True,
           prior="expected"),
    Method("rdr-kv-sinks", ladder=kv_tiers, observation=64, floor=0.5, relative=True,
           chosen_sinks=True),
    Method("rdr-kv-exact", ladder=kv_tiers, observation=64, floor=0.5, relative=True,
           exact=True),
    Method("rdr-kv-centred", ladder=kv_tiers, observation=64, floor=0.5, relative=True,
           centred=True),
    Method("rdr-kv-scaled", ladder=kv_tiers, observation=64, floor=0.5, relative=True,
           centred=True, scaled=True),
    Method("rdr-kv-recall", ladder=kv_tiers, observation=64, floor=0.5, relative=True,
           recall=32),
    Method("rdr-kv-recall-centred", ladder=kv_tiers, observation=64, floor=0.5, relative=True,
           recall=32, centred=True),
    Method("rdr-kv-recall-centred-sinks", ladder=kv_tiers, observation=64, floor=0.5,
           relative=True, recall=32, centred=True, chosen_sinks=True, sink_floor="int8"),
    Method("rdr-kv-1bit", ladder=functools.partial(kv_tiers, pairs=((1, 1), *KV_PAIRS)),
           observation=64, floor=0.5, relative=True),
    Method("streamingllm", tiers=("fp16",), estimator=Recency()),
    Method("snapkv", tiers=("fp16",), estimator="snapkv"),
    Method("h2o", tiers=("fp16",), estimator="h2o"),
    Method("keydiff", tiers=("fp16",), estimator="keydiff"),
    Method("manifoldkv", tiers=("fp16",), estimator="manifoldkv"),
    Method("manifoldkv-windowed", tiers=("fp16",), estimator="manifoldkv-windowed"),
    Method("kivi", ladder=_kivi_tiers, drop=False, paged_keys=True),
    Method("turboquant", tiers=("turbo2", "turbo3", "turbo4"), drop=False),
    Method("polarquant", ladder=_polar_tiers, drop=False),
    Method("fibquant", ladder=_fib_tiers, drop=False),
)}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None
