"""Decode steps replayed as CUDA graphs (``sphkv.integrations.hf.graph``) against the same
generation with every step eager, on a GPU: the same tokens, the same logits to rounding, the
same allocations and the budget held at every step; the graph serves every step between
admissions but the first two after each, and stays off where it cannot serve (a sliding
layer)."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from sphkv.integrations.hf.cache import SphkvCache
from sphkv.integrations.hf.config import cache_argument
from sphkv.integrations.hf.generate import compressed_attention, fp16_cache_bytes

from .fixtures import TINY, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (CUDA graphs)")

NEW, PROMPT, W = 40, 48, 8


class _Check(StoppingCriteria):
    """After every step: the bytes held within the budget, and the kept items per tier."""

    def __init__(self, cache):
        self.cache, self.placements = cache, []

    def __call__(self, input_ids, scores, **kwargs):
        cache = self.cache
        assert cache.nbytes() == cache.held_bytes() <= cache.budget
        self.placements.append({t: sorted(p.position[p.valid].tolist())
                                for t, p in cache.store.pools.items()})
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _generate(model, ids, method: str, graphs: bool, fraction: float = 0.3, mask=None):
    budget = fraction * fp16_cache_bytes(model.config, ids.shape[0], PROMPT + NEW)
    cache = SphkvCache(model.config, budget, method, window=W, page_size=4)
    check = _Check(cache)
    with torch.no_grad(), compressed_attention(model, graphs=graphs):
        out = model.generate(ids, attention_mask=mask, **{cache_argument(model): cache},
                             max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True,
                             stopping_criteria=StoppingCriteriaList([check]))
    return out.sequences, torch.stack(out.logits).float(), cache, check


@pytest.mark.parametrize("method", ["rdr", "rdr-ada", "rdr-kv"])
@pytest.mark.parametrize("batch", [1, 3])
def test_graphed_decode_equals_eager(method, batch):
    model = tiny_model().cuda()
    ids = torch.randint(0, TINY["vocab_size"], (batch, PROMPT),
                        generator=torch.Generator().manual_seed(3)).cuda()
    ref, ref_logits, ref_cache, ref_check = _generate(model, ids, method, graphs=False)
    out, logits, cache, check = _generate(model, ids, method, graphs=True)
    steps = cache.decode_graph.steps
    admissions = sum(kind == "admit" for kind, _ in cache.timings)
    print(f"{method}, B={batch}: {steps}, {admissions} admissions")
    assert cache.decode_graph.disabled is None
    assert ref_cache.decode_graph is None  # graphs=False: the forward is not wrapped
    # the prefill is eager; after it and after each admission: one eager step, one captured
    assert steps["eager"] == admissions + 2 and steps["captured"] == admissions + 1
    assert steps["replayed"] == NEW - 1 - 2 * (admissions + 1) > NEW // 2
    assert check.placements == ref_check.placements
    assert cache.history == ref_cache.history
    assert torch.equal(out, ref)
    err = ((logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)).max().item()
    assert err < 1e-3, err


def test_graphed_decode_with_left_padding():
    model = tiny_model().cuda()
    pads = torch.tensor([0, 5, 9])
    ids = torch.randint(1, TINY["vocab_size"], (3, PROMPT),
                        generator=torch.Generator().manual_seed(5))
    mask = (torch.arange(PROMPT)[None, :] >= pads[:, None]).long()
    ids, mask = (ids * mask).cuda(), mask.cuda()
    ref, ref_logits, ref_cache, ref_check = _generate(model, ids, "rdr", False, mask=mask)
    out, logits, cache, check = _generate(model, ids, "rdr", True, mask=mask)
    assert cache.pad.tolist() == pads.tolist()
    assert cache.decode_graph.steps["replayed"] > NEW // 2
    assert check.placements == ref_check.placements and cache.history == ref_cache.history
    assert torch.equal(out, ref)
    err = ((logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)).max().item()
    assert err < 1e-3, err


def test_graphs_stay_off_for_sliding_layers():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=40)).eval().cuda()
    ids = torch.randint(0, TINY["vocab_size"], (1, PROMPT),
                        generator=torch.Generator().manual_seed(4)).cuda()
    # a sliding layer's fp16 cache holds its window only: a larger share of it
    ref, ref_logits, *_ = _generate(model, ids, "rdr", graphs=False, fraction=0.8)
    out, logits, cache, _ = _generate(model, ids, "rdr", graphs=True, fraction=0.8)
    assert cache.decode_graph.steps == {"eager": NEW, "captured": 0, "replayed": 0}
    assert torch.equal(out, ref) and torch.equal(logits, ref_logits)
