"""The forward wrapper of ``compressed_attention`` (``sphkv.integrations.hf.graph``) on the CPU,
where no step can be a CUDA graph: installed for the block only, never twice, and every call
passes through to the model's forward (the GPU behaviour is in ``test_gpu_graphs.py``)."""

from __future__ import annotations

import torch

from sphkv.integrations.hf.cache import SphkvCache
from sphkv.integrations.hf.config import cache_argument
from sphkv.integrations.hf.generate import compressed_attention, fp16_cache_bytes

from .fixtures import TINY, tiny_model


def test_wrapper_lives_for_the_block_and_wraps_once():
    model = tiny_model()
    assert "forward" not in vars(model)
    with compressed_attention(model):
        wrapped = model.forward
        assert "forward" in vars(model)
        with compressed_attention(model):
            assert model.forward is wrapped  # the inner block leaves the outer wrapper
        assert model.forward is wrapped
    assert "forward" not in vars(model)
    with compressed_attention(model, graphs=False):
        assert "forward" not in vars(model)


def test_cpu_steps_pass_through_eagerly():
    model = tiny_model()
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    budget = 0.4 * fp16_cache_bytes(model.config, 2, 40 + 24)
    out = {}
    for graphs in (False, True):
        cache = SphkvCache(model.config, budget, "rdr", window=8, page_size=4)
        with torch.no_grad(), compressed_attention(model, graphs=graphs):
            out[graphs] = model.generate(ids, **{cache_argument(model): cache},
                                         max_new_tokens=24, min_new_tokens=24, do_sample=False)
        if graphs:
            # the prompt's forward and 23 decode steps, all eager on the CPU
            assert cache.decode_graph.steps == {"eager": 24, "captured": 0, "replayed": 0}
            assert cache.decode_graph.disabled is None
        else:
            assert cache.decode_graph is None
    assert torch.equal(out[False], out[True])
