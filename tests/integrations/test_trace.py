"""Trace capture, the safetensors round trip, and clear errors on bad files."""

from __future__ import annotations

import gzip
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from sphkv.cli import app
from sphkv.integrations.hf import (
    Trace,
    TraceFormatError,
    capture_trace,
    load_trace,
    read_tokens,
    save_trace,
)

from .fixtures import TINY, byte_tokenizer


def _reference_qkv(model, ids):
    """Post-RoPE q, k, v per layer recomputed from the model's weights, layer by layer."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    pos = torch.arange(ids.numel())[None]
    h = inner.embed_tokens(ids[None])
    cos, sin = inner.rotary_emb(h, pos)
    out = []
    for layer in inner.layers:
        x = layer.input_layernorm(h)
        att = layer.self_attn
        d = att.head_dim
        q = att.q_proj(x).view(1, -1, TINY["num_attention_heads"], d).transpose(1, 2)
        k = att.k_proj(x).view(1, -1, TINY["num_key_value_heads"], d).transpose(1, 2)
        v = att.v_proj(x).view(1, -1, TINY["num_key_value_heads"], d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out.append((q[0], k[0], v[0]))
        h = layer(h, position_embeddings=(cos, sin), position_ids=pos, attention_mask=None)
        h = h[0] if isinstance(h, tuple) else h
    return out


def test_capture_matches_reference(tiny):
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    trace = capture_trace(tiny, ids, window=8, model_name="tiny")
    assert trace.keys.shape == (2, 2, 40, 16) and trace.values.shape == trace.keys.shape
    assert trace.queries.shape == (2, 4, 8, 16) and trace.group == 2
    assert trace.positions.tolist() == list(range(40))
    with torch.no_grad():
        ref = _reference_qkv(tiny, ids)
    for layer, (q, k, v) in enumerate(ref):
        torch.testing.assert_close(trace.keys[layer], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(trace.values[layer], v, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(trace.queries[layer], q[:, -8:], rtol=1e-5, atol=1e-5)
    # the model's attention implementation is restored afterwards
    assert tiny.config._attn_implementation != "sphkv_capture"


def test_round_trip(small_trace, tmp_path):
    path = save_trace(small_trace, tmp_path / "t.safetensors")
    back = load_trace(path)
    for name in ("keys", "values", "queries", "positions"):
        assert torch.equal(getattr(back, name), getattr(small_trace, name)), name
    assert back.model == "tiny-llama" and back.dtype == "float32"
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["layers"] == "2" and meta["q_heads"] == "4" and meta["kv_heads"] == "2"
    assert meta["head_dim"] == "16" and meta["window"] == "16" and meta["tokens"] == "96"
    assert meta["sphkv_version"] and meta["format"] == "sphkv.trace"


def _rewrite(src, dst, drop=(), meta=None, tensors=None):
    with safe_open(src, framework="pt") as f:
        old_meta = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    data.update(tensors or {})
    save_file(data, dst, metadata={**old_meta, **(meta or {})})
    return dst


@pytest.fixture()
def trace_file(small_trace, tmp_path):
    return save_trace(small_trace, tmp_path / "good.safetensors")


@pytest.mark.parametrize("case, change, message", [
    ("missing-tensor", dict(drop=("layers.1.values",)), r"misses tensors \['layers.1.values'\]"),
    ("missing-positions", dict(drop=("positions",)), r"misses tensors \['positions'\]"),
    ("wrong-format", dict(meta={"format": "other"}), "not a 'sphkv.trace' file"),
    ("wrong-version", dict(meta={"version": "99"}), "version '99'"),
    ("bad-int", dict(meta={"tokens": "many"}), "tokens='many' is not an integer"),
    ("bad-dtype", dict(meta={"dtype": "int4"}), "dtype='int4'"),
    ("layers-mismatch", dict(meta={"layers": "3"}), "misses tensors .*layers.2.keys"),
    ("kv-heads-mismatch", dict(meta={"kv_heads": "4"}), "layers.0.keys is .* implies"),
    ("window-mismatch", dict(meta={"window": "8"}), "layers.0.queries is .* implies"),
    ("extra-tensor", dict(tensors={"junk": torch.zeros(2)}), r"unexpected tensors \['junk'\]"),
    ("dtype-mismatch", dict(tensors={"layers.0.keys": torch.zeros(2, 96, 16).half()}),
     "layers.0.keys is torch.float16"),
    ("nan", dict(tensors={"layers.1.queries": torch.full((4, 16, 16), math.nan)}),
     "queries of layer 1 hold non-finite"),
    ("gqa", dict(meta={"q_heads": "3"}, tensors={f"layers.{i}.queries": torch.zeros(3, 16, 16)
                                                 for i in range(2)}), "multiple of kv_heads"),
])
def test_mismatched_files_raise(trace_file, tmp_path, case, change, message):
    bad = _rewrite(trace_file, tmp_path / f"{case}.safetensors", **change)
    with pytest.raises(TraceFormatError, match=message):
        load_trace(bad)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_file_raises(trace_file, tmp_path, keep):
    data = trace_file.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(TraceFormatError, match="truncated or corrupt"):
        load_trace(bad)


def test_corrupt_header_and_other_files_raise(trace_file, tmp_path):
    data = bytearray(trace_file.read_bytes())
    data[8:20] = b"\xff" * 12  # the JSON header
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match="truncated or corrupt"):
        load_trace(bad)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(TraceFormatError, match="truncated or corrupt"):
        load_trace(text)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, plain)
    with pytest.raises(TraceFormatError, match="format None"):
        load_trace(plain)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trace(tmp_path / "absent.safetensors")


def test_trace_checks_its_shapes(small_trace):
    t = small_trace
    with pytest.raises(TraceFormatError, match="values .* same shape"):
        Trace(t.keys, t.values[:, :, 1:], t.queries, t.positions)
    with pytest.raises(TraceFormatError, match="window=96 must lie|queries .* must match"):
        Trace(t.keys, t.values, t.queries[:1], t.positions)
    with pytest.raises(TraceFormatError, match="positions must be int64"):
        Trace(t.keys, t.values, t.queries, t.positions[1:])


def test_capture_rejects_bad_window(tiny):
    with pytest.raises(ValueError, match="window must lie in"):
        capture_trace(tiny, torch.arange(10), window=11)


def test_read_tokens_plain_and_gzip(tmp_path):
    tok = byte_tokenizer()
    text = "It is a truth universally acknowledged. " * 20
    (tmp_path / "a.txt").write_text(text)
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    plain = read_tokens(tok, tmp_path / "a.txt", 300)
    assert plain.shape == (300,)
    assert torch.equal(plain, read_tokens(tok, tmp_path / "a.txt.gz", 300))
    with pytest.raises(ValueError, match="holds only"):
        read_tokens(tok, tmp_path / "a.txt", 10_000)


def test_capture_cli(tiny_dir, tmp_path):
    text = tmp_path / "book.txt.gz"
    with gzip.open(text, "wt", encoding="utf-8") as f:
        f.write("She was the youngest of the two daughters of a most affectionate father. " * 9)
    out = tmp_path / "trace.safetensors"
    result = CliRunner().invoke(app, ["capture", "--model", str(tiny_dir), "--text", str(text),
                                      "--tokens", "128", "--window", "24", "--out", str(out)])
    assert result.exit_code == 0, result.output
    trace = load_trace(out)
    assert trace.keys.shape == (2, 2, 128, 16) and trace.window == 24
    assert trace.model == str(tiny_dir) and trace.source == "book.txt.gz"
    bad = CliRunner().invoke(app, ["capture", "--model", str(tiny_dir), "--text", str(text),
                                   "--tokens", "16", "--window", "24", "--out", str(out)])
    assert bad.exit_code == 2 and "--window" in bad.output


@pytest.mark.slow
def test_smollm2_smoke(smollm2_trace, tmp_path):
    t = smollm2_trace
    assert t.keys.shape == (30, 3, 256, 64) and t.queries.shape == (30, 9, 32, 64)
    back = load_trace(save_trace(t, tmp_path / "smollm2.safetensors"))
    assert torch.equal(back.keys, t.keys) and back.model == "smollm2"
    # post-RoPE keys of one head differ in norm across positions, values too: a real cache
    assert t.keys.norm(dim=-1).std() > 0 and torch.isfinite(t.queries).all()


def test_sliding_layers_captured_with_their_pattern(tmp_path):
    """A Mistral trace: the capture attends with the sliding masks (its keys equal the model's
    own cache), the layout travels in the file, the distortion model sees each query's window,
    and the allocation drops what the model can no longer see."""
    from transformers import DynamicCache, MistralConfig, MistralForCausalLM

    from sphkv.integrations.hf import cache_argument
    from sphkv.rdr import default_tiers, problem_from_trace
    from sphkv.rdr.distortion import distortion_matrix, invisible
    from sphkv.rdr.layout import LayerAttention

    s, n, w = 16, 64, 8
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=s)).eval()
    ids = torch.randint(0, TINY["vocab_size"], (1, n), generator=torch.Generator().manual_seed(0))
    trace = capture_trace(model, ids, window=w)
    assert trace.layout == (LayerAttention("sliding", s),) * 2
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **{cache_argument(model): cache})
    held = cache.layers[1].keys[0]  # the model's own cache: the last S - 1 tokens
    torch.testing.assert_close(trace.keys[1, :, -held.shape[1]:], held, atol=1e-5, rtol=1e-5)
    back = load_trace(save_trace(trace, tmp_path / "mistral.safetensors"))
    assert back.layout == trace.layout
    tiers = default_tiers(TINY["head_dim"])
    d = distortion_matrix(trace, tiers)
    # a token no window query sees has no distortion at any tier: its drop costs nothing
    unseen = n - w - s + 1  # positions below the first window query's window
    assert (d[:, :, :unseen] == 0).all() and (d[:, :, unseen:, 0] > 0).any()
    problem = problem_from_trace(trace, tiers, budget=1.0, sinks=0)
    gone = invisible(trace)
    assert gone.sum(axis=1).tolist() == [n - s + 1] * 2
    forced = problem.forced.reshape(2, -1, n)
    assert (forced[:, :, gone[0]] == 0).all()
    # a fraction of the model's own cache: S - 1 tokens per layer and head, at fp16
    per_item = tiers.costs[-1]
    assert problem.budget < 2 * TINY["num_key_value_heads"] * n * per_item / 2
