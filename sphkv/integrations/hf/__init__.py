"""Hugging Face integration: model loading and KV-trace capture.

``load_model("smollm2")`` or any causal LM name or path; :func:`capture_trace` prefills a text
and records post-RoPE keys, values and the observation window's queries per layer;
:func:`save_trace` / :func:`load_trace` write and read them as validated ``.safetensors``.
"""

from sphkv.integrations.hf.model import SMOLLM2, load_model, resolve_model
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
    "SMOLLM2",
    "TRACE_FORMAT",
    "TRACE_FORMAT_VERSION",
    "Trace",
    "TraceFormatError",
    "capture_trace",
    "load_model",
    "load_trace",
    "read_tokens",
    "resolve_model",
    "save_trace",
]
