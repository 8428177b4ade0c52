"""The baseline methods of the quality evaluation at real head dimensions (64, 128): their
ladders, their tier restrictions and the budget through :class:`SphkvCache`.

``test_cache.py`` already runs every method of :data:`METHODS` through a long generation at the
tiny model's head dimension (16); here each new method runs a prefill and a few decoding steps
on a tiny Llama whose heads are as wide as real ones.
"""

from dataclasses import fields

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from sphkv.integrations.hf.cache import METHODS, SphkvCache, register_attention
from sphkv.integrations.hf.config import cache_argument
from sphkv.integrations.hf.generate import fp16_cache_bytes
from sphkv.rdr.tiers import KV_PAIRS, kv_tiers, scalar_tiers
from sphkv.rdr.utility import ESTIMATORS, AccumulatedAttention, Estimator

from .fixtures import TINY

DROP_ONLY = ("h2o", "manifoldkv", "manifoldkv-windowed")
QUANTIZE_ONLY = ("polarquant", "fibquant")
NEW = (*DROP_ONLY, *QUANTIZE_ONLY, "rdr-scalar", "kivi")
DIMS = (64, 128)
PROMPT, NEW_TOKENS, WINDOW = 96, 12, 8


@pytest.fixture(scope="module", params=DIMS, ids=[f"D{d}" for d in DIMS])
def model(request):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, "head_dim": request.param})).eval()


class _Held(StoppingCriteria):
    """After every step: the cache holds what it accounts for, within the budget."""

    def __init__(self, cache):
        self.cache = cache

    def __call__(self, input_ids, scores, **kwargs):
        assert self.cache.nbytes() == self.cache.held_bytes() <= self.cache.budget
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _run(model, method: str, fraction: float) -> SphkvCache:
    """Prefill ``PROMPT`` random tokens and decode ``NEW_TOKENS`` at ``fraction`` of fp16."""
    ids = torch.randint(0, TINY["vocab_size"], (1, PROMPT),
                        generator=torch.Generator().manual_seed(7))
    budget = fraction * fp16_cache_bytes(model.config, 1, PROMPT + NEW_TOKENS)
    cache = SphkvCache(model.config, budget, method, window=WINDOW, page_size=4)
    model.set_attn_implementation(register_attention())
    try:
        with torch.no_grad():
            model.generate(ids, **{cache_argument(model): cache}, max_new_tokens=NEW_TOKENS,
                           do_sample=False, stopping_criteria=StoppingCriteriaList([_Held(cache)]))
    finally:
        model.set_attn_implementation("sdpa")
    return cache


def _kept(cache: SphkvCache) -> dict[str, int]:
    """Items kept per tier name, over all groups."""
    kept: dict[str, int] = {}
    for g in range(len(cache.store.tables)):
        for t, pos in cache.store.positions(g).items():
            kept[cache.tiers[t].name] = kept.get(cache.tiers[t].name, 0) + len(pos)
    return kept


def _seen(cache: SphkvCache) -> int:
    """Items that left the window: kept or dropped."""
    paged = cache.layers[0].length - cache.layers[0].keys.shape[-2]
    return TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * paged


def test_registry_has_the_baselines():
    assert set(NEW) <= set(METHODS)
    for name in DROP_ONLY:
        assert METHODS[name].tier_set(64).names == ["drop", "fp16"] and METHODS[name].drop
    for name in QUANTIZE_ONLY:
        assert not METHODS[name].drop
    assert METHODS["rdr-scalar"].drop and METHODS["rdr-scalar"].get_estimator() is None
    assert type(METHODS["h2o"].get_estimator()) is AccumulatedAttention


@pytest.mark.parametrize("d", DIMS)
def test_scalar_tiers(d):
    tiers = scalar_tiers(d)
    assert tiers.names == ["drop", "int2", "int4", "int8", "fp16"]
    # KIVI per token: b d / 8 code bytes + fp16 scale and zero per 32 channels; int8: d + 2
    kivi = [b * d // 8 + 4 * d // 32 for b in (2, 4)]
    assert tiers.costs.tolist() == [0, *(2 * c for c in kivi), 2 * (d + 2), 4 * d]
    for name in ("int2", "int4"):
        tier = tiers[tiers.index(name)]
        assert tier.key.axis == tier.value.axis == "token"
    assert METHODS["rdr-scalar"].tier_set(d).names == tiers.names


@pytest.mark.parametrize("d", DIMS)
def test_kv_tiers_pair_key_and_value_depths(d):
    tiers = kv_tiers(d)
    assert tiers.names == ["drop", "k2v1", "k2v2", "k3v2", "k4v2", "k4v3", "k4v4", "k8v4",
                           "int8", "fp16"]
    # TurboQuant: b d / 8 code bytes + an fp16 norm; int8: d bytes + an fp16 scale
    size = {b: d + 2 if b == 8 else b * d // 8 + 2 for b in (1, 2, 3, 4, 8)}
    assert tiers.costs.tolist() == [0, *(size[a] + size[b] for a, b in KV_PAIRS), 4 * d]
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(5, d, generator=rng)
    for (a, b), tier in zip(KV_PAIRS, tiers.tiers[1:-1], strict=True):
        assert tier.key.bytes_per_vector == size[a] and tier.value.bytes_per_vector == size[b]
        # the byte count is what the codecs write
        for codec in (tier.key, tier.value):
            assert codec.encode(x).nbytes == 5 * codec.bytes_per_vector, codec
    # one codec object per bit depth, shared by the pairs that use it
    assert tiers[tiers.index("k4v2")].key is tiers[tiers.index("k4v4")].value
    assert METHODS["rdr-kv"].tier_set(d).names == tiers.names and METHODS["rdr-kv"].drop
    with pytest.raises(ValueError, match="strictly increasing"):
        kv_tiers(d, ((3, 1), (2, 2)))


@pytest.mark.parametrize("d", DIMS)
def test_quantizer_ladders_span_an_eighth_to_a_third_of_fp16(d):
    polar, fib = (METHODS[m].tier_set(d) for m in QUANTIZE_ONLY)
    assert polar.names == ["drop", "polar2", "polar3", "polar4"]
    assert fib.names == ["drop", "fib2", "fib3", "fib4"]
    # FibQuant at 2, 3, 4 bits costs what TurboQuant does; PolarQuant keys + KIVI values more
    assert fib.costs.tolist() == METHODS["turboquant"].tier_set(d).costs.tolist()
    for ladder in (polar, fib):
        fraction = ladder.costs[1:] / (4 * d)
        assert 0.125 <= fraction[0] < 0.18 and 0.25 < fraction[-1] < 0.31


@pytest.mark.parametrize("d", DIMS)
def test_kivi_keys_per_channel_over_a_page_values_per_token(d):
    from sphkv.codec import KiviCodec

    for page_size in (4, 16):
        tiers = METHODS["kivi"].tier_set(d, page_size)
        assert tiers.names == ["drop", "kivi2", "kivi4"]
        for tier, bits in zip(tiers[1:], (2, 4), strict=True):
            assert tier.key == KiviCodec(d=d, bits=bits, group_size=page_size, axis="channel")
            assert tier.value == KiviCodec(d=d, bits=bits, group_size=32, axis="token")
            # codes, then fp16 scale and zero: per channel per page, per 32 channels per token
            assert tier.bytes_per_token_head == (2 * bits * d // 8 + 4 * d // page_size
                                                 + 4 * d // 32)


def test_all_queries_attribute():
    assert Estimator.all_queries is False
    assert AccumulatedAttention.all_queries is True
    assert AccumulatedAttention().all_queries is True
    # a class attribute, not a dataclass field: no constructor argument, not in the repr
    assert "all_queries" not in {f.name for f in fields(AccumulatedAttention)}
    assert {name for name, e in ESTIMATORS.items() if e.all_queries} == {"h2o"}


@pytest.mark.parametrize("method", NEW)
def test_budget_held_and_tiers_within_the_ladder(model, method):
    cache = _run(model, method, 0.3)
    assert cache.history[0] <= cache.peak_bytes <= cache.budget
    d = model.config.head_dim
    kept = _kept(cache)
    assert set(kept) <= set(METHODS[method].tier_set(d).names) - {"drop"}
    if method in DROP_ONLY:
        assert set(kept) == {"fp16"}
        assert 0 < sum(kept.values()) < _seen(cache)


@pytest.mark.parametrize("method", (*QUANTIZE_ONLY, "kivi"))
def test_quantize_only_drops_nothing_at_a_generous_budget(model, method):
    cache = _run(model, method, 0.9)
    kept = _kept(cache)
    assert sum(kept.values()) == _seen(cache)
    assert "fp16" not in kept and len(kept) >= 1
