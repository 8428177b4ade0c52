"""A recalling method (``Method.recall``): an fp16 copy of every token that left the window,
in host memory, and the allocation solved again over it every ``recall`` tokens — within the
budget at every write, dropped tokens brought back, exact at a budget that holds everything."""

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from sphkv.integrations.hf import compressed_attention, compressed_generate
from sphkv.integrations.hf.cache import METHODS, SphkvCache
from sphkv.integrations.hf.config import cache_argument
from sphkv.integrations.hf.generate import fp16_cache_bytes
from sphkv.rdr.methods import Method

from .fixtures import TINY, tiny_model
from .test_cache import _generate, _ids
from .test_layouts import _model, _prompt

RECALL = dataclasses.replace(METHODS["rdr-kv-recall"], recall=16)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _kept(cache) -> set[tuple[int, int]]:
    """``{(group, position)}`` of every token the store holds."""
    return {(g, p) for g in range(cache.store.groups)
            for pos in cache.store.positions(g).values() for p in pos.tolist()}


def test_revisions_hold_the_budget_and_bring_dropped_tokens_back(model, monkeypatch):
    """Every step within the budget (and every decoded page equal to the store's codes:
    ``_generate``'s check); a revision every 16 tokens; some revision keeps a token the store
    had dropped; the host copy holds every token that left the window, the prompt's equal to
    the model's own keys and values at fp16."""
    prompt, new = 48, 48
    kept_before, kept_after = [], []
    revise = SphkvCache._revise

    def watched(self):
        kept_before.append(_kept(self))
        revise(self)
        kept_after.append(_kept(self))

    monkeypatch.setattr(SphkvCache, "_revise", watched)
    ids = _ids(prompt, seed=5)
    budget = 0.3 * fp16_cache_bytes(model.config, 1, prompt + new)
    _, cache = _generate(model, ids, budget, method=RECALL, new=new)
    assert cache.peak_bytes <= budget
    # lengths 49 … 95 pass through the cache; revisions at 64 and 80
    assert [kind for kind, _ in cache.timings].count("revise") == len(kept_after) == 2
    seen = {(g, p) for g in range(cache.store.groups) for p in range(cache.admitted)}
    recalled = [after - before for before, after in zip(kept_before, kept_after, strict=True)]
    assert any(recalled), "no revision brought a token back: the test shows nothing"
    assert all(r <= seen for r in recalled)
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{cache_argument(model): plain}, use_cache=True)
    first = prompt - 8  # the prefill leaves the last W = 8 prompt tokens in the window
    for layer, ref in zip(cache.layers, plain.layers, strict=True):
        keys, values = layer.host
        assert layer.host_start == 0 and keys.shape[2] == cache.admitted == layer.start
        assert keys.device.type == "cpu" and keys.dtype == torch.float16
        for mine, theirs in ((keys, ref.keys), (values, ref.values)):
            # the first layer's exactly; later ones after attention over fp16 keys and values
            torch.testing.assert_close(mine[:, :, :first], theirs[:, :, :first].half(),
                                       rtol=1e-2, atol=1e-3)
    # the buffers double when full, and hold the window behind the copy at a revision
    per_token = TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * TINY["head_dim"] * 4
    held = cache.admitted * per_token
    assert held <= cache.host_bytes() <= 2 * (held + 2 * 8 * per_token)


def test_at_a_budget_that_holds_everything_it_generates_as_transformers(model):
    ids = _ids(40, seed=2)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=40, do_sample=False)
    out, cache = _generate(model, ids, 1e9, method=RECALL, new=40)
    assert torch.equal(out, ref)
    assert [kind for kind, _ in cache.timings].count("revise") >= 2


def test_revised_store_is_the_prefill_of_the_same_tokens(model):
    """Right after a revision the store holds what a prefill allocates over the same keys,
    values and queries (a deferred cache given the recalling cache's fp16 copy and its last
    queries, then compressed): the revision is the prefill's solve over every token seen."""
    ids = _ids(64, seed=7)
    budget = 0.3 * fp16_cache_bytes(model.config, 1, 96)
    cache = SphkvCache(model.config, budget, RECALL, window=8, page_size=4)
    deferred = SphkvCache(model.config, None, window=8, page_size=4)
    with torch.no_grad(), compressed_attention(model):
        model(ids[:, :48], **{cache_argument(model): cache}, use_cache=True)
        for t in range(48, 64):  # the revision at length 64
            # what a CUDA graph's capture asks: will the allocator write after this step?
            writes, steps = cache.writes_after(1), len(cache.timings)
            model(ids[:, t:t + 1], **{cache_argument(model): cache}, use_cache=True)
            assert writes == (len(cache.timings) > steps)
        model(ids, **{cache_argument(model): deferred}, use_cache=True)
    assert [kind for kind, _ in cache.timings].count("revise") == 1
    for mine, theirs in zip(cache.layers, deferred.layers, strict=True):
        theirs.keys, theirs.values, start = mine.seen()
        assert start == 0
    deferred._queries = dict(cache._queries)
    fresh = deferred.compress(dataclasses.replace(RECALL, recall=0), budget)
    assert fresh.admitted == cache.admitted  # the same window
    assert _kept(fresh) == _kept(cache)
    assert fresh.store.nbytes() == cache.store.nbytes()
    assert fresh.price == cache.price


@pytest.mark.parametrize("name", ["mistral", "gemma3"])
def test_sliding_layers_keep_on_host_only_what_they_can_see(name):
    sliding, window, new = 32, 4, 60
    model = _model(name, sliding)
    ids, mask = _prompt(3)
    budget = 0.6 * fp16_cache_bytes(model.config, 2, ids.shape[1] + new)
    _, cache = compressed_generate(model, ids, bytes=budget, method=RECALL, max_new_tokens=new,
                                   attention_mask=mask, window=window, page_size=4,
                                   min_new_tokens=new)
    assert max(cache.history) <= budget
    assert [kind for kind, _ in cache.timings].count("revise") >= 3
    length = cache.get_seq_length()
    for layer in cache.layers:
        if layer.attention.is_full:
            assert layer.host_start == 0
        else:  # what the next query cannot see is gone from the host too
            assert length - sliding + 1 - 2 * window <= layer.host_start <= length - sliding + 1
            for pos in cache.store.positions(cache.group(0, layer.index, 0)).values():
                assert int(pos.min()) >= layer.host_start


def test_recall_is_validated_and_keeps_the_observed_queries(model):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="recall must be an integer >= 0"):
            Method("bad", recall=bad)
    # a revision reads the last 64 queries (the observation), not the admissions' 2W = 16
    cache = SphkvCache(model.config, 1e9, RECALL, window=8, page_size=4)
    ids = _ids(81)
    with torch.no_grad(), compressed_attention(model):
        model(ids[:, :80], **{cache_argument(model): cache}, use_cache=True)
        assert {q.shape[2] for q in cache._queries.values()} == {cache.observation} == {64}
        model(ids[:, 80:], **{cache_argument(model): cache}, use_cache=True)
        assert {q.shape[2] for q in cache._queries.values()} == {64}


def test_centred_recall_keeps_offsets_and_generates_exactly(model):
    """Over centred storage (``rdr-kv-recall-centred``) the host copy holds the offsets the
    codecs encode (plus the means: the model's keys and values), every step stays within the
    budget across two revisions, and a budget that holds everything generates as transformers
    does."""
    method = dataclasses.replace(METHODS["rdr-kv-recall-centred"], recall=16)
    ids = _ids(48, seed=5)
    budget = 0.3 * fp16_cache_bytes(model.config, 1, 96)
    _, cache = _generate(model, ids, budget, method=method, new=48)
    assert cache.peak_bytes <= budget
    assert [kind for kind, _ in cache.timings].count("revise") == 2
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{cache_argument(model): plain}, use_cache=True)
    layer, ref = cache.layers[0], plain.layers[0]
    first = 48 - 8
    for offsets, mean, theirs in zip(layer.host, layer.mean, (ref.keys, ref.values),
                                     strict=True):
        torch.testing.assert_close((offsets[:, :, :first].float() + mean.float()).half(),
                                   theirs[:, :, :first].half(), rtol=1e-2, atol=2e-3)
        # the offsets alone are not the vectors
        assert (offsets[:, :, :first].float() - theirs[:, :, :first]).abs().max() > 0.02
    with torch.no_grad():
        ref = model.generate(_ids(40, seed=2), max_new_tokens=40, do_sample=False)
    out, cache = _generate(model, _ids(40, seed=2), 1e9, method=method, new=40)
    assert torch.equal(out, ref)
    assert [kind for kind, _ in cache.timings].count("revise") >= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned memory)")
def test_upload_copies_a_strided_host_view_as_it_reads():
    """The host copy's tokens of a layer (``[B, H, n, d]`` in buffers of a larger capacity,
    flattened to ``[B·H, n, d]`` and cut to a later start) reach the GPU equal to ``.to``'s."""
    from sphkv.integrations.hf.cache import _upload

    buf = torch.randn(2, 3, 40, 8, dtype=torch.float16).pin_memory()
    for x in (buf[:, :, :29].flatten(0, 1), buf[:, :, :29].flatten(0, 1)[:, 5:],
              buf[1:, :, :7].flatten(0, 1), buf[:, :, :40].flatten(0, 1)):
        assert x.is_pinned()
        got = _upload(x, torch.device("cuda"))
        assert got.device.type == "cuda" and got.shape == x.shape
        assert torch.equal(got.cpu(), x)
