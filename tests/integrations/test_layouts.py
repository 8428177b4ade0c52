"""The compressed cache on every attention layout: full (Llama, Qwen3), sliding window (Mistral),
mixed full and sliding layers (Qwen2, Gemma-3).

At a budget that keeps everything, the logits equal plain transformers' at every step of a
prefill plus 100 decode steps, the prompt several times longer than the sliding window, with and
without left padding. At real budgets the bytes stay within the budget after every write, sliding
layers keep only what they can still see, and bad layouts are refused by name.
"""

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from sphkv.integrations.hf import (
    SphkvCache,
    attention_layout,
    cache_argument,
    compressed_attention,
    compressed_generate,
    fp16_cache_bytes,
)
from sphkv.rdr.layout import LayerAttention
from sphkv.rdr.problem import InfeasibleBudgetError

SLIDING, PROMPT, STEPS, WINDOW = 16, 64, 100, 8
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(num_hidden_layers=2)),
    "mistral": (MistralConfig, MistralForCausalLM,
                dict(num_hidden_layers=2, sliding_window=SLIDING)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM,
              dict(num_hidden_layers=2, use_sliding_window=True, sliding_window=SLIDING,
                   max_window_layers=1)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(num_hidden_layers=2)),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM,
               dict(num_hidden_layers=3, sliding_window=SLIDING,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
}


def _model(name, sliding=SLIDING):
    config, model, extra = MODELS[name]
    if "sliding_window" in extra:
        extra = {**extra, "sliding_window": sliding}
    torch.manual_seed(0)
    return model(config(**BASE, **extra)).eval()


def _prompt(pad: int):
    ids = torch.randint(0, 256, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, :pad] = 0
    return ids, mask


GPU = pytest.mark.skipif(not torch.cuda.is_available(),
                         reason="needs a CUDA GPU (the Triton kernels' device path)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("pad", [0, 5], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("name", list(MODELS))
def test_keep_everything_equals_transformers_at_every_step(name, pad, device):
    model = _model(name).to(device)
    ids, mask = (x.to(device) for x in _prompt(pad))
    with torch.no_grad():
        seq = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS,
                             min_new_tokens=STEPS, do_sample=False)
        full = torch.cat([mask, torch.ones(2, STEPS, dtype=torch.long, device=device)], dim=1)
        positions = (full.cumsum(-1) - 1).clamp(min=0)
        ref = model(seq, attention_mask=full, position_ids=positions, use_cache=False).logits
        cache = SphkvCache(model.config, 1e12, "rdr", window=WINDOW, page_size=4)
        arg = {cache_argument(model): cache}
        errors = []
        with compressed_attention(model):
            for a, b in [(0, PROMPT)] + [(t, t + 1) for t in range(PROMPT, PROMPT + STEPS - 1)]:
                out = model(seq[:, a:b], attention_mask=full[:, :b],
                            position_ids=positions[:, a:b], **arg).logits[:, -1]
                want = ref[:, b - 1]
                errors.append(float((out - want).norm() / want.norm()))
    # keys and values are held at fp16 (the kernels' queries too): the logits differ by its
    # rounding only
    assert max(errors) < (2e-3 if device == "cpu" else 1e-2), \
        f"largest relative logit error {max(errors):.2e}"
    assert cache.get_seq_length() == PROMPT + STEPS - 1
    assert cache.pad.tolist() == [0, pad]
    assert cache.peak_bytes <= cache.budget


@pytest.mark.parametrize("name", ["mistral", "gemma3"])
def test_sliding_layers_keep_only_their_window_within_the_budget(name):
    # a window of 32 leaves room to compress beside the fp16 window (2W = 8 tokens)
    sliding, window, new = 32, 4, 60
    model = _model(name, sliding)
    ids, mask = _prompt(3)
    budget = 0.6 * fp16_cache_bytes(model.config, 2, PROMPT + new)
    out, cache = compressed_generate(model, ids, bytes=budget, method="rdr", max_new_tokens=new,
                                     attention_mask=mask, window=window, page_size=4,
                                     min_new_tokens=new)
    assert out.shape[1] == PROMPT + new
    # after every pool write, not only after every step
    assert len(cache.history) > new // window and max(cache.history) <= budget
    assert cache.nbytes() == cache.held_bytes()
    # the allocator compressed: some tokens sit below fp16
    assert any(p.pages for t, p in cache.store.pools.items() if t < len(cache.tiers) - 1)
    length = cache.get_seq_length()
    for layer in cache.layers:
        if layer.attention.is_full:
            continue
        lowest = length - sliding + 1  # what the next query sees
        assert layer.start >= min(lowest, length - 2 * window)
        # pages are evicted at each admission (every W steps): what slid out since is masked
        for b in range(2):
            for h in range(cache.kv_heads):
                for pos in cache.store.positions(cache.group(b, layer.index, h)).values():
                    assert int(pos.min()) >= lowest - 2 * window
    # the budget as a fraction refers to the model's own cache, sliding layers at their window
    layout = attention_layout(model.config)
    held = sum(a.held_tokens(PROMPT + new) for a in layout)
    assert fp16_cache_bytes(model.config, 2, PROMPT + new) == 2 * 2 * 4 * 16 * held
    assert any(not a.is_full for a in layout)


def test_layouts_from_configs():
    assert [a.kind for a in attention_layout(_model("gemma3").config)] == \
        ["sliding", "sliding", "full"]
    assert attention_layout(_model("mistral").config) == [LayerAttention("sliding", SLIDING)] * 2
    assert [a.kind for a in attention_layout(_model("qwen2").config)] == ["full", "sliding"]
    config = LlamaConfig(**BASE, num_hidden_layers=2, attention_chunk_size=8,
                         layer_types=["chunked_attention", "full_attention"])
    assert attention_layout(config) == [LayerAttention("chunked", 8), LayerAttention("full")]


def test_chunked_visibility_matches_transformers():
    from transformers.masking_utils import chunked_overlay

    layer = LayerAttention("chunked", 5)
    pad = torch.tensor([0, 3])
    inner = chunked_overlay(5, pad)
    for b in range(2):
        for q in range(int(pad[b]), 30):
            first = int(layer.first_visible(torch.tensor(q), pad[b]))
            seen = [kv for kv in range(q + 1) if kv >= pad[b] and inner(b, 0, q, kv)]
            assert seen == list(range(first, q + 1))


@pytest.mark.parametrize("bad, match", [
    (dict(layer_types=["linear_attention", "full_attention"]), "linear_attention"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "sliding_window"),
    (dict(layer_types=["full_attention"]), "lists 1 layers"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
])
def test_unsupported_layouts_are_refused_by_name(bad, match):
    config = LlamaConfig(**BASE, num_hidden_layers=2)
    for key, value in bad.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=match):
        SphkvCache(config, 1e9)


def test_bad_input_is_refused_with_a_clear_error():
    model = _model("mistral")
    ids, _ = _prompt(0)
    with pytest.raises(ValueError, match="num_beams"):
        compressed_generate(model, ids, fraction=0.5, num_beams=2)
    # below the windows and the sinks' pages: refused when the prompt's forward ends
    with pytest.raises(InfeasibleBudgetError, match="at least"):
        compressed_generate(model, ids[:, :8], fraction=0.001, max_new_tokens=4)
    with pytest.raises(ValueError, match="window"):
        SphkvCache(model.config, 1e9, window=0)
    with pytest.raises(ValueError, match="left padding"):
        cache = SphkvCache(model.config, 1e9)
        cache.set_padding(torch.tensor([[1, 0, 1]]), 1)
