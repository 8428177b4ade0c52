"""Head sensitivities: the gradient they square, the model left as it was, and how a
``sensitive`` method's cache weighs each (layer, query head) with them."""

import numpy as np
import pytest
import torch

from sphkv.integrations.hf.cache import SphkvCache, register_attention
from sphkv.integrations.hf.config import cache_argument
from sphkv.integrations.hf.sensitivity import calibration_ids, head_sensitivity
from sphkv.rdr.online import Tokens

from .fixtures import TINY, byte_tokenizer, tiny_model

L, HQ, D = TINY["num_hidden_layers"], TINY["num_attention_heads"], TINY["head_dim"]


def _ids(n: int, seed: int = 0, batch: int | None = None) -> torch.Tensor:
    shape = (n,) if batch is None else (batch, n)
    return torch.randint(0, TINY["vocab_size"], shape,
                         generator=torch.Generator().manual_seed(seed))


def _reference(model, ids, scored, seed):
    """The same weights through another path: the gradient at each attention block's output
    (after ``o_proj``), pulled back through ``o_proj``'s weight to each head's input slice."""
    outs = []

    def keep(_m, _args, out):
        out[0].retain_grad()
        outs.append(out[0])

    hooks = [layer.self_attn.register_forward_hook(keep) for layer in model.model.layers]
    try:
        logits = model(ids[None]).logits[0, -scored:]
        generator = torch.Generator().manual_seed(seed)
        labels = torch.multinomial(logits.detach().softmax(-1), 1, generator=generator)[:, 0]
        model.zero_grad()
        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for layer, out in zip(model.model.layers, outs, strict=True):
        g = out.grad[0, -scored:] @ layer.self_attn.o_proj.weight.detach()  # ∂ℓ/∂(o_proj input)
        rows.append(g.reshape(scored, HQ, D).double().square().sum(-1).mean(0).numpy())
    model.zero_grad()
    return np.stack(rows)


def test_equals_the_gradient_pulled_back_through_the_projection():
    model, ids = tiny_model(), _ids(48)
    got = head_sensitivity(model, ids, scored=20, seed=3)
    assert got.shape == (L, HQ) and (got > 0).all()
    np.testing.assert_allclose(got, _reference(model, ids, 20, 3), rtol=1e-4)
    # half the positions by default; the seed draws the labels
    np.testing.assert_allclose(head_sensitivity(model, ids, seed=3),
                               _reference(model, ids, 24, 3), rtol=1e-4)
    assert not np.allclose(head_sensitivity(model, ids, seed=4), got)


def test_a_head_the_projection_ignores_weighs_nothing():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 2 * D:3 * D] = 0
    got = head_sensitivity(model, _ids(32))
    assert got[1, 2] == 0
    assert (np.delete(got.ravel(), 1 * HQ + 2) > 0).all()


def test_the_model_is_left_as_it_was():
    model, ids = tiny_model(), _ids(32)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        before = model(ids[None]).logits
    head_sensitivity(model, ids)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids[None]).logits, before)


@pytest.mark.parametrize("ids, scored, match", [
    (torch.tensor([5]), None, "at least 2 tokens"),
    (torch.arange(10), 0, r"scored must be in \[1, 10\]"),
    (torch.arange(10), 11, r"scored must be in \[1, 10\]"),
])
def test_bad_arguments(ids, scored, match):
    with pytest.raises(ValueError, match=match):
        head_sensitivity(tiny_model(), ids, scored=scored)


def test_a_model_without_named_projections_is_refused():
    model = tiny_model()
    model.model.layers[0].self_attn.o_proj = None
    del model.model.layers[0].self_attn.o_proj
    with pytest.raises(ValueError, match="found 1 attention output projections"):
        head_sensitivity(model, _ids(8))


def test_calibration_ids_come_from_the_shipped_text():
    tok = byte_tokenizer()
    ids = calibration_ids(tok, 300)
    assert ids.shape == (300,)
    assert tok.decode(ids[:12]).startswith("It is a trut")


# --- the cache ------------------------------------------------------------------------------

def test_a_sensitive_method_needs_weights_of_the_models_shape():
    config = tiny_model().config
    with pytest.raises(ValueError, match="head_weights=head_sensitivity"):
        SphkvCache(config, 1e6, "rdr-kv-fisher")
    with pytest.raises(ValueError, match=r"shape \[layers, query heads\] = \[2, 4\]"):
        SphkvCache(config, 1e6, "rdr-kv-fisher", head_weights=np.ones((4, 2)))
    for bad in (np.zeros((L, HQ)), np.full((L, HQ), np.nan)):
        with pytest.raises(ValueError, match="finite and > 0"):
            SphkvCache(config, 1e6, "rdr-kv-fisher", head_weights=bad)
    # other methods take and ignore them
    assert SphkvCache(config, 1e6, "rdr-kv", head_weights=np.ones((L, HQ))).method.name == "rdr-kv"


def _prefill_rows(model, weights, ids):
    shared = SphkvCache(model.config, None, window=8, page_size=4, head_weights=weights)
    model.set_attn_implementation(register_attention())
    try:
        with torch.no_grad():
            model(ids, **{cache_argument(model): shared})
    finally:
        model.set_attn_implementation("sdpa")
    cache = shared.compress("rdr-kv-fisher", 1e9)
    return cache, Tokens.cat(shared._prefill_items[repr(cache.method), cache.window])


def test_each_weight_reaches_the_rows_of_its_own_head():
    """Raising one (layer, query head)'s weight changes the rows of its kv-head in that layer,
    for every sequence of the batch, and no other group's."""
    model, ids = tiny_model(), _ids(40, seed=2, batch=2)
    cache, base = _prefill_rows(model, np.ones((L, HQ)), ids)
    group_size = HQ // TINY["num_key_value_heads"]
    for layer, head in ((0, 3), (1, 0)):
        weights = np.ones((L, HQ))
        weights[layer, head] = 10.0
        _, raised = _prefill_rows(model, weights, ids)
        assert np.array_equal(raised.group, base.group)
        for g in np.unique(base.group):
            on = base.group == g
            if g in [cache.group(b, layer, head // group_size) for b in range(2)]:
                assert (raised.distortion[on] >= base.distortion[on] - 1e-12).all()
                assert (raised.distortion[on] > base.distortion[on] * (1 + 1e-6)).any()
            else:
                np.testing.assert_allclose(raised.distortion[on], base.distortion[on],
                                           rtol=1e-12)


def test_equal_weights_scale_every_row():
    model, ids = tiny_model(), _ids(40, seed=2, batch=1)
    _, one = _prefill_rows(model, np.ones((L, HQ)), ids)
    _, three = _prefill_rows(model, np.full((L, HQ), 3.0), ids)
    np.testing.assert_allclose(three.distortion, 3 * one.distortion, rtol=1e-5)
