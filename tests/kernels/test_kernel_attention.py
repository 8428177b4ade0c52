"""The kernel path of the compressed cache's attention against ``CompressedLayer.attend``, step
by step through a generation of the tiny model: mixed tiers, left padding, GQA.

The model and its cache run on ``DEVICE`` (the GPU where there is one, else the CPU under the
Triton interpreter); the reference is the torch path of the same cache (``cache.kernel`` off).
"""

from __future__ import annotations

import pytest
import torch

from sphkv.integrations.hf.cache import CompressedLayer, SphkvCache, register_attention
from sphkv.integrations.hf.config import cache_argument
from sphkv.integrations.hf.generate import fp16_cache_bytes
from sphkv.integrations.hf.kernel_attention import kernel_attend
from tests.integrations.fixtures import TINY, tiny_model
from tests.kernels.common import DEVICE, assert_close


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    # a 24-token sliding window: the pages' oldest tokens are hidden from the last queries
    return MistralForCausalLM(MistralConfig(**TINY, sliding_window=24)).eval()


@pytest.mark.parametrize("name", ["llama", "mistral"])
@pytest.mark.parametrize("method", ["rdr", "rdr-ada"])
def test_kernel_attend_matches_attend(monkeypatch, method, name):
    model = (tiny_model() if name == "llama" else _mistral()).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (2, 32), generator=gen).to(DEVICE)
    # sequence 1 is left-padded by 5 tokens
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    new = 3
    # bytes as a fraction of a full-attention cache (the sliding one's windows take more of it)
    budget = (0.6 if name == "llama" else 0.8) * fp16_cache_bytes(tiny_model().config, 2,
                                                                  32 + new)
    cache = SphkvCache(model.config, budget, method, window=8, page_size=4)
    cache.kernel = False  # attend() computes the reference in torch, on any device
    attend, seen, tables, reused = CompressedLayer.attend, [], {}, []

    def both(layer, query, attention_mask, scaling):
        ref = attend(layer, query, attention_mask, scaling)
        out = kernel_attend(layer, query, scaling)
        tiers = {layer.cache.tiers[t].name for t, p in layer.cache.store.pools.items()
                 if p.pages} if layer.cache.store is not None else set()
        seen.append((query.shape[2], tiers))
        if layer.cache.store is not None:
            # the page tables are built once per write of the store, not once per step
            version, out_tables = layer._runs
            if tables.get(layer.index, (None,))[0] == version:
                assert tables[layer.index][1] is out_tables
                reused.append(layer.index)
            tables[layer.index] = (version, out_tables)
        # rows of fully padded queries are 0 in both
        assert_close(f"layer {layer.index}, m={query.shape[2]}, {sorted(tiers)}", ref.float(),
                     out.float(), 3e-3)
        return ref

    monkeypatch.setattr(CompressedLayer, "attend", both)
    model.set_attn_implementation(register_attention())
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, **{cache_argument(model): cache},
                       max_new_tokens=new, do_sample=False)
    # the prefill, then decode steps over pages of several tiers
    assert seen[0][0] == 32 and all(m == 1 for m, _ in seen[2:])
    assert max(len(t) for _, t in seen) >= 2, seen
    assert reused


@pytest.mark.parametrize("method", ["rdr", "rdr-ada"])
def test_kernel_attend_many_queries_over_pages(monkeypatch, method):
    """A prompt fed in two forwards: the second's 72 queries (G·m = 144 rows, more than one
    launch holds) attend over the first's pages in blocks of 64 and 8."""
    model = tiny_model().to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40 + 72), generator=gen).to(DEVICE)
    budget = 0.6 * fp16_cache_bytes(model.config, 2, ids.shape[1])
    cache = SphkvCache(model.config, budget, method, window=8, page_size=4)
    cache.kernel = False
    attend, blocked = CompressedLayer.attend, []

    def both(layer, query, attention_mask, scaling):
        ref = attend(layer, query, attention_mask, scaling)
        if query.shape[2] == 72:
            assert layer.cache.store is not None
            assert_close(f"layer {layer.index}, 72 queries over pages", ref.float(),
                         kernel_attend(layer, query, scaling).float(), 3e-3)
            blocked.append(layer.index)
        return ref

    monkeypatch.setattr(CompressedLayer, "attend", both)
    model.set_attn_implementation(register_attention())
    with torch.no_grad():
        model(ids[:, :40], **{cache_argument(model): cache}, use_cache=True)
        model(ids[:, 40:], **{cache_argument(model): cache}, use_cache=True)
    assert blocked == [0, 1]
