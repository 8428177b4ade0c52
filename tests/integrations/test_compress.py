"""``compress(model, fraction= | bytes=)``: model.generate through the compressed cache inside a
``with`` block, the model as before after it."""

import pytest
import torch

from sphkv.integrations.hf import compress, compressed_generate, fp16_cache_bytes

from .fixtures import TINY, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (1, n), generator=torch.Generator().manual_seed(7))


def test_compress_equals_compressed_generate_and_restores_the_model(model):
    ids = _ids(48)
    with compress(model, fraction=0.5, window=8, page_size=4) as press:
        out = model.generate(ids, max_new_tokens=12)
    ref, cache = compressed_generate(model, ids, fraction=0.5, max_new_tokens=12, window=8,
                                     page_size=4)
    assert torch.equal(out, ref)
    assert press.cache.budget == cache.budget == 0.5 * fp16_cache_bytes(model.config, 1, 60)
    assert press.cache.peak_bytes <= press.cache.budget
    assert model.config._attn_implementation == "sdpa" and "generate" not in vars(model)


def test_compress_takes_bytes_and_refuses_ambiguity(model):
    with compress(model, bytes=2e6, window=8, page_size=4) as press:
        model.generate(_ids(32), max_new_tokens=4)
    assert press.cache.budget == 2e6
    with pytest.raises(TypeError, match="exactly one of"):
        compress(model)
    with pytest.raises(ValueError, match="fraction must lie in"):
        compress(model, fraction=2)
    assert "generate" not in vars(model)
