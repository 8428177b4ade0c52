"""Traces are written atomically and carry a checksum that loading verifies."""

import os

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from sphkv.integrations.hf.trace import TraceFormatError, load_trace, save_trace


def test_a_flipped_data_byte_is_refused(small_trace, tmp_path):
    path = save_trace(small_trace, tmp_path / "t.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # the last tensor's bytes, past the header
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match=r"t\.safetensors.*sha256"):
        load_trace(path)


def test_traces_without_a_checksum_are_still_read(small_trace, tmp_path):
    path = save_trace(small_trace, tmp_path / "t.safetensors")
    with safe_open(path, framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "sha256"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    old = tmp_path / "old.safetensors"
    save_file(tensors, old, metadata=meta)
    assert load_trace(old).tokens == small_trace.tokens


def test_save_replaces_atomically_and_leaves_no_temporary(small_trace, tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_text("previous")
    save_trace(small_trace, path)
    assert load_trace(path).layers == small_trace.layers
    assert os.listdir(tmp_path) == ["t.safetensors"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_trace(small_trace, tmp_path / "absent" / "t.safetensors")
