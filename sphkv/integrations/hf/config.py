"""What sphkv reads from a Hugging Face model config: shapes and each layer's attention layout."""

from __future__ import annotations

from sphkv.rdr.layout import LayerAttention

__all__ = ["attention_layout", "cache_argument", "fp16_cache_bytes", "head_dim"]

# transformers' layer types -> sphkv's layouts
_KINDS = {"full_attention": "full", "sliding_attention": "sliding",
          "chunked_attention": "chunked"}


def _text(config):
    return config.get_text_config(decoder=True)


def head_dim(config) -> int:
    text = _text(config)
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def attention_layout(config) -> list[LayerAttention]:
    """Each layer's attention pattern: ``config.layer_types`` (full, sliding, chunked) where
    present, else every layer sliding under a global ``sliding_window`` (Mistral), chunked under
    ``attention_chunk_size``, or full.

    Raises
    ------
    ValueError
        A layer type or setting sphkv cannot run correctly (linear attention, attention-logit
        soft-capping, layers that share another layer's cache, …), named.
    """
    text = _text(config)
    n = text.num_hidden_layers
    for name in ("attn_logit_softcapping", "kv_sharing_modes"):
        if getattr(text, name, None) is not None:
            raise ValueError(f"the model's config sets {name}={getattr(text, name)!r}; the "
                             f"sphkv cache computes plain softmax attention over each layer's "
                             f"own keys and does not support it")
    window = getattr(text, "sliding_window", None)
    chunk = getattr(text, "attention_chunk_size", None)
    types = getattr(text, "layer_types", None)
    if types is None:
        kind = "sliding_attention" if window is not None else \
            "chunked_attention" if chunk is not None else "full_attention"
        types = [kind] * n
    if len(types) != n:
        raise ValueError(f"config.layer_types lists {len(types)} layers; the model has {n}")
    layout = []
    for i, t in enumerate(types):
        if t not in _KINDS:
            raise ValueError(f"layer {i} has attention type {t!r}; the sphkv cache handles "
                             f"{', '.join(_KINDS)}")
        size = window if t == "sliding_attention" else chunk if t == "chunked_attention" \
            else None
        if t != "full_attention" and size is None:
            setting = "sliding_window" if t == "sliding_attention" else "attention_chunk_size"
            raise ValueError(f"layer {i} is {t} but the config sets no {setting}")
        layout.append(LayerAttention(_KINDS[t], None if size is None else int(size)))
    return layout


def fp16_cache_bytes(config, batch: int, tokens: int) -> int:
    """Bytes of the model's own fp16 KV cache after ``tokens`` tokens per sequence: a sliding or
    chunked layer holds at most its window or chunk."""
    text = _text(config)
    per_token = batch * text.num_key_value_heads * 4 * head_dim(config)
    return sum(per_token * layer.held_tokens(tokens) for layer in attention_layout(config))


def cache_argument(model) -> str:
    """The keyword under which ``model`` (its ``forward`` and ``generate``) takes a cache:
    ``cache`` in the transformers releases that renamed it, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"
