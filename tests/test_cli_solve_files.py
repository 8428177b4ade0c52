"""`sphkv solve` with files that are missing, foreign, damaged or being replaced."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sphkv.cli import app
from sphkv.integrations.hf.trace import save_trace
from sphkv.rdr import synthetic_problem
from tests.integrations.fixtures import tiny_trace

runner = CliRunner()


@pytest.fixture(scope="module")
def problem_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli-files") / "problem.npz"
    synthetic_problem(layers=2, kv_heads=3, tokens=128, recent=8).save(path)
    return path


def _refused(args, message):
    result = runner.invoke(app, ["solve", *args])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    def squeeze(text):  # rich wraps the message in a box
        return "".join(ch for ch in text if not ch.isspace() and ch != "│")

    assert squeeze(message) in squeeze(result.output)


def test_out_in_a_missing_folder_is_refused_before_solving(problem_file, tmp_path):
    _refused([str(problem_file), "--out", str(tmp_path / "absent" / "a.json")],
             "does not exist")


def test_out_replaces_the_file_whole(problem_file, tmp_path):
    out = tmp_path / "alloc.json"
    out.write_text("previous")
    result = runner.invoke(app, ["solve", str(problem_file), "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert len(json.loads(out.read_text())["tiers"]) == 2 * 3 * 128
    assert [p.name for p in tmp_path.iterdir()] == ["alloc.json"]  # no temporary left


@pytest.mark.parametrize("content", [b'{"distortion": [[1, 0]]}', b"\x08\x00\x00\x00{}..."],
                         ids=["json", "safetensors"])
def test_foreign_files_named_npz_are_named_as_such(tmp_path, content):
    path = tmp_path / "p.npz"
    path.write_bytes(content)
    _refused([str(path)], "is not a .npz archive")


def test_npz_metadata_without_a_field_is_named(problem_file, tmp_path):
    with np.load(problem_file) as z:
        arrays = dict(z)
    meta = json.loads(str(arrays["meta"]))
    del meta["page_size"]
    arrays["meta"] = np.array(json.dumps(meta))
    path = tmp_path / "p.npz"
    np.savez(path, **arrays)
    _refused([str(path)], "lacks the fields ['page_size']")


def test_a_trace_with_a_flipped_byte_is_refused(tmp_path):
    path = save_trace(tiny_trace(), tmp_path / "t.safetensors")
    ok = runner.invoke(app, ["solve", str(path), "--budget", "0.5", "--json"])
    assert ok.exit_code == 0, ok.output
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))
    _refused([str(path), "--budget", "0.5"], "sha256")
