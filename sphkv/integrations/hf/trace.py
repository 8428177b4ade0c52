"""KV traces: post-RoPE keys, values and observation-window queries of one prefill, on disk.

A trace is what the offline allocation needs from a model: for every layer the keys and values
the cache would hold and the queries of the last W positions (the observation window, from
which utilities and distortions are measured).

File layout (``.safetensors``), format ``sphkv.trace`` version :data:`TRACE_FORMAT_VERSION`:

- tensors ``layers.{l}.keys`` and ``layers.{l}.values`` ``[kv_heads, tokens, head_dim]``,
  ``layers.{l}.queries`` ``[q_heads, window, head_dim]`` (all of dtype ``dtype``), and
  ``positions`` int64 ``[tokens]`` (the RoPE position of each cached token);
- string metadata ``format``, ``version``, ``model``, ``source``, ``layers``, ``q_heads``,
  ``kv_heads``, ``head_dim``, ``tokens``, ``window``, ``dtype``, ``sphkv_version``,
  ``layout`` (each layer's attention pattern, ``full``, ``sliding:S`` or ``chunked:C``, comma
  separated; files written before it have none and read as every layer full), and
  ``sha256`` (hex SHA-256 over each tensor's name, dtype, shape and bytes in name order; files
  written before it have none and are read unchecked).

:func:`load_trace` checks all of it and raises :class:`TraceFormatError` naming what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import sphkv
from sphkv.integrations.hf.config import attention_layout
from sphkv.rdr.layout import LayerAttention

__all__ = ["TRACE_FORMAT", "TRACE_FORMAT_VERSION", "Trace", "TraceFormatError", "capture_trace",
           "load_trace", "save_trace"]

TRACE_FORMAT = "sphkv.trace"
TRACE_FORMAT_VERSION = 1
_INT_FIELDS = ("layers", "q_heads", "kv_heads", "head_dim", "tokens", "window")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TraceFormatError(ValueError):
    """A trace file or trace object is not what its format promises."""


@dataclass
class Trace:
    """Post-RoPE keys, values and observation-window queries of one prefill.

    Attributes
    ----------
    keys, values : torch.Tensor
        ``[L, H_kv, n, d]``, as the KV cache holds them (keys after RoPE).
    queries : torch.Tensor
        ``[L, H_q, W, d]``: queries (after RoPE) of the last W positions; query head h reads
        kv-head ``h // (H_q // H_kv)``.
    positions : torch.Tensor
        int64 ``[n]``: RoPE position of each token; the window's are ``positions[-W:]``.
    model : str
        The model name or path it came from.
    source : str
        The text it came from (a file name), or empty.
    sphkv_version : str
        The sphkv version that wrote it.
    layout : tuple of LayerAttention, optional
        Each layer's attention pattern (full, sliding, chunked); every layer full if omitted.
    """

    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    positions: torch.Tensor
    model: str = ""
    source: str = ""
    sphkv_version: str = field(default=sphkv.__version__)
    layout: tuple[LayerAttention, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("keys", "values", "queries"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise TraceFormatError(f"{name} must be a 4-d tensor [layers, heads, tokens, "
                                       f"head_dim], got {shape}")
            if t.dtype not in _DTYPES.values():
                raise TraceFormatError(f"{name} has dtype {t.dtype}; expected one of "
                                       f"{', '.join(_DTYPES)}")
        if self.values.shape != self.keys.shape:
            raise TraceFormatError(f"values {tuple(self.values.shape)} and keys "
                                   f"{tuple(self.keys.shape)} must have the same shape")
        layers, kv_heads, tokens, d = self.keys.shape
        ql, q_heads, window, qd = self.queries.shape
        if (ql, qd) != (layers, d):
            raise TraceFormatError(f"queries {tuple(self.queries.shape)} must match keys "
                                   f"{tuple(self.keys.shape)} in layers and head_dim")
        if q_heads % kv_heads:
            raise TraceFormatError(f"q_heads={q_heads} must be a multiple of kv_heads="
                                   f"{kv_heads} (grouped-query attention)")
        if not 1 <= window <= tokens:
            raise TraceFormatError(f"window={window} must lie in [1, tokens={tokens}]")
        if self.positions.shape != (tokens,) or self.positions.dtype != torch.int64:
            raise TraceFormatError(f"positions must be int64 of shape ({tokens},), got "
                                   f"{self.positions.dtype} {tuple(self.positions.shape)}")
        if torch.any(self.positions[1:] <= self.positions[:-1]):
            raise TraceFormatError("positions must be strictly increasing")
        self.layout = tuple(self.layout) if self.layout is not None \
            else (LayerAttention(),) * layers
        if len(self.layout) != layers or not all(isinstance(a, LayerAttention)
                                                 for a in self.layout):
            raise TraceFormatError(f"layout must give one LayerAttention per layer ({layers}), "
                                   f"got {self.layout!r}")
        for name in ("keys", "values", "queries"):
            t = getattr(self, name)
            if not torch.isfinite(t).all():
                layer = int(torch.nonzero(~torch.isfinite(t))[0, 0])
                raise TraceFormatError(f"{name} of layer {layer} hold non-finite values")

    @property
    def layers(self) -> int:
        return self.keys.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    @property
    def q_heads(self) -> int:
        return self.queries.shape[1]

    @property
    def group(self) -> int:
        """Query heads per kv-head."""
        return self.q_heads // self.kv_heads

    @property
    def tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[3]

    @property
    def window(self) -> int:
        return self.queries.shape[2]

    @property
    def dtype(self) -> str:
        return str(self.keys.dtype).removeprefix("torch.")

    def metadata(self) -> dict[str, str]:
        """The string metadata stored in the file header."""
        return {"format": TRACE_FORMAT, "version": str(TRACE_FORMAT_VERSION),
                "model": self.model, "source": self.source, "layers": str(self.layers),
                "q_heads": str(self.q_heads), "kv_heads": str(self.kv_heads),
                "head_dim": str(self.head_dim), "tokens": str(self.tokens),
                "window": str(self.window), "dtype": self.dtype,
                "sphkv_version": self.sphkv_version,
                "layout": ",".join(str(a) for a in self.layout)}


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Write ``trace`` as ``.safetensors`` (layout in the module docstring), atomically.

    The file is written beside ``path`` under a temporary name and renamed over it, so a reader
    never sees a half-written trace and an interrupted write leaves the old file. The metadata
    carries ``sha256``, a checksum of the tensors that :func:`load_trace` verifies.
    """
    tensors = {"positions": trace.positions.contiguous()}
    for layer in range(trace.layers):
        for name in ("keys", "values", "queries"):
            tensors[f"layers.{layer}.{name}"] = getattr(trace, name)[layer].contiguous()
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist (for trace {path})")
    metadata = trace.metadata() | {"sha256": _checksum(tensors)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace written by :func:`save_trace`.

    Raises
    ------
    FileNotFoundError
        There is no such file.
    TraceFormatError
        The file is truncated or corrupt, is not a sphkv trace of this version, misses tensors
        or metadata, or holds tensors whose shapes or dtypes disagree with its metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise TraceFormatError(f"{path} is not a readable .safetensors file (truncated or "
                               f"corrupt?): {exc}") from exc
    if meta.get("format") != TRACE_FORMAT:
        raise TraceFormatError(f"{path} has format {meta.get('format')!r}, not a "
                               f"{TRACE_FORMAT!r} file")
    if meta.get("version") != str(TRACE_FORMAT_VERSION):
        raise TraceFormatError(f"{path} has trace format version {meta.get('version')!r}; "
                               f"this sphkv reads version {TRACE_FORMAT_VERSION}")
    missing = [k for k in (*_INT_FIELDS, "dtype", "model", "source", "sphkv_version")
               if k not in meta]
    if missing:
        raise TraceFormatError(f"{path} lacks metadata {missing}")
    dims = {}
    for k in _INT_FIELDS:
        try:
            dims[k] = int(meta[k])
        except ValueError:
            raise TraceFormatError(f"{path}: metadata {k}={meta[k]!r} is not an integer") from None
        if dims[k] < 1:
            raise TraceFormatError(f"{path}: metadata {k}={dims[k]} must be >= 1")
    dtype = _DTYPES.get(meta["dtype"])
    if dtype is None:
        raise TraceFormatError(f"{path}: metadata dtype={meta['dtype']!r} is not one of "
                               f"{', '.join(_DTYPES)}")
    expected = {"positions": ((dims["tokens"],), torch.int64)}
    kv_shape = (dims["kv_heads"], dims["tokens"], dims["head_dim"])
    for layer in range(dims["layers"]):
        expected[f"layers.{layer}.keys"] = (kv_shape, dtype)
        expected[f"layers.{layer}.values"] = (kv_shape, dtype)
        expected[f"layers.{layer}.queries"] = (
            (dims["q_heads"], dims["window"], dims["head_dim"]), dtype)
    absent = [k for k in expected if k not in tensors]
    if absent:
        raise TraceFormatError(f"{path} misses tensors {absent[:6]}"
                               f"{' …' if len(absent) > 6 else ''} (metadata says "
                               f"{dims['layers']} layers)")
    extra = sorted(tensors.keys() - expected.keys())
    if extra:
        raise TraceFormatError(f"{path} holds unexpected tensors {extra[:6]}")
    for name, (shape, dt) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dt:
            raise TraceFormatError(f"{path}: tensor {name} is {t.dtype} {tuple(t.shape)}, but "
                                   f"the metadata implies {dt} {shape}")
    try:
        trace = Trace(
            keys=torch.stack([tensors[f"layers.{i}.keys"] for i in range(dims["layers"])]),
            values=torch.stack([tensors[f"layers.{i}.values"] for i in range(dims["layers"])]),
            queries=torch.stack([tensors[f"layers.{i}.queries"]
                                 for i in range(dims["layers"])]),
            positions=tensors["positions"], model=meta["model"], source=meta["source"],
            sphkv_version=meta["sphkv_version"], layout=_layout(meta.get("layout")))
    except TraceFormatError as exc:
        raise TraceFormatError(f"{path}: {exc}") from exc
    # Checked last, so a malformed file is reported by what is wrong with it. Traces written
    # before the checksum have none; any that carry one must match it.
    if "sha256" in meta and _checksum(tensors) != meta["sha256"]:
        raise TraceFormatError(f"{path}: its tensors do not match the sha256 checksum in its "
                               "metadata (the file was changed or corrupted after it was "
                               "written)")
    return trace


def _layout(text: str | None) -> tuple[LayerAttention, ...] | None:
    """The layout metadata (absent in traces written before it: every layer full)."""
    if text is None:
        return None
    try:
        return tuple(LayerAttention.parse(part) for part in text.split(","))
    except ValueError as exc:
        raise TraceFormatError(f"metadata layout={text!r}: {exc}") from None


@contextlib.contextmanager
def _recording(model, window: int, store: dict, on_layer=None):
    """Route attention through a function that records q, k, v of each layer, then attends.

    Why an attention function and not forward hooks: the function registered with
    ``transformers.AttentionInterface`` receives exactly the tensors attention uses — queries and
    keys after RoPE (and after any q/k norm, as in Qwen3), keys and values before GQA
    repetition — for every model that dispatches through ``ALL_ATTENTION_FUNCTIONS`` (Llama,
    Qwen, Mistral, …). A forward hook on the attention module only sees hidden states, and a hook
    on ``q_proj``/``k_proj`` sees pre-RoPE projections, so it would have to re-implement each
    architecture's rotary embedding and norms.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = model.config._attn_implementation
    # "eager" lives in each model file, not in the registry; SDPA computes the same attention.
    attend = ALL_ATTENTION_FUNCTIONS.get(previous, sdpa_attention_forward)

    def record(module, query, key, value, attention_mask, **kwargs):
        # batch 1: query [1, H_q, n, d], key and value [1, H_kv, n, d]
        store[module.layer_idx] = (key.detach()[0], value.detach()[0],
                                   query.detach()[0, :, -window:])
        if on_layer is not None:
            on_layer(len(store))
        return attend(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("sphkv_capture", record)
    # SDPA's masks, built per layer type (sliding layers get their window)
    AttentionMaskInterface.register("sphkv_capture", sdpa_mask)
    model.set_attn_implementation("sphkv_capture")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def capture_trace(model, input_ids: torch.Tensor, window: int = 64, model_name: str = "",
                  source: str = "", progress=None) -> Trace:
    """Prefill ``input_ids`` and return the trace of keys, values and the last queries.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM whose attention dispatches through ``AttentionInterface``.
    input_ids : torch.Tensor
        int ``[n]`` or ``[1, n]``: one sequence, prefilled at positions ``0 … n-1``.
    window : int
        Observation window W: queries of the last W positions are kept.
    model_name, source : str
        Stored in the trace's metadata.
    progress : rich.progress.Progress, optional
        Where to show a bar advancing per layer.
    """
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    n = ids.shape[1]
    if not 1 <= window <= n:
        raise ValueError(f"window must lie in [1, {n}] (the prefilled tokens), got {window}")
    layers = model.config.num_hidden_layers
    store: dict[int, tuple[torch.Tensor, ...]] = {}
    on_layer = None
    if progress is not None:
        task = progress.add_task(f"prefill {n:,} tokens", total=layers)

        def on_layer(done: int) -> None:
            progress.update(task, completed=done)

    with torch.no_grad(), _recording(model, window, store, on_layer):
        # logits_to_keep=1: the LM head runs on the last position only (n × vocab is large)
        model(ids, use_cache=False, logits_to_keep=1)
    if sorted(store) != list(range(layers)):
        raise RuntimeError(f"recorded attention of layers {sorted(store)}, expected 0…{layers - 1}"
                           f": does this model dispatch attention through AttentionInterface?")
    keys, values, queries = (torch.stack([store[i][j] for i in range(layers)]) for j in range(3))
    return Trace(keys=keys.contiguous(), values=values.contiguous(),
                 queries=queries.contiguous(), positions=torch.arange(n, dtype=torch.int64),
                 model=model_name, source=source, layout=tuple(attention_layout(model.config)))
