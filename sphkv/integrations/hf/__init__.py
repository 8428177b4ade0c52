"""Hugging Face integration: the compressed cache in ``generate``, model loading, KV traces.

Generation under a byte budget::

    from sphkv.integrations.hf import compress, compressed_generate, load_model

    model, tok = load_model("smollm2")
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with compress(model, fraction=0.25):       # or bytes=2e6
        out = model.generate(ids, max_new_tokens=32)

    out, cache = compressed_generate(model, ids, fraction=0.25, method="rdr", max_new_tokens=32)

or, with ``model.generate`` itself, :class:`SphkvCache` as the cache inside
:func:`compressed_attention` (:func:`cache_argument` names the keyword the installed
transformers takes). :data:`METHODS` lists the methods. ``load_model`` takes ``smollm2``, a hub
name, a local folder, a ``.gguf`` file or a folder holding one; :func:`capture_trace` prefills a
text and records post-RoPE keys, values and the observation window's queries per layer;
:func:`save_trace` / :func:`load_trace` write and read them as validated ``.safetensors``.
"""

from sphkv.integrations.hf.cache import METHODS, SphkvCache
from sphkv.integrations.hf.config import attention_layout, cache_argument, fp16_cache_bytes
from sphkv.integrations.hf.generate import compress, compressed_attention, compressed_generate
from sphkv.integrations.hf.model import SMOLLM2, load_model, resolve_model
from sphkv.integrations.hf.sensitivity import calibration_ids, head_sensitivity
from sphkv.integrations.hf.text import read_tokens
from sphkv.integrations.hf.trace import (
    TRACE_FORMAT,
    TRACE_FORMAT_VERSION,
    Trace,
    TraceFormatError,
    capture_trace,
    load_trace,
    save_trace,
)

__all__ = [
    "METHODS",
    "SMOLLM2",
    "TRACE_FORMAT",
    "TRACE_FORMAT_VERSION",
    "SphkvCache",
    "Trace",
    "TraceFormatError",
    "attention_layout",
    "cache_argument",
    "calibration_ids",
    "capture_trace",
    "compress",
    "compressed_attention",
    "compressed_generate",
    "fp16_cache_bytes",
    "head_sensitivity",
    "load_model",
    "load_trace",
    "read_tokens",
    "resolve_model",
    "save_trace",
]
