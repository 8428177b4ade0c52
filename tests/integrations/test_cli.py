"""`sphkv solve` on a trace and `sphkv plot rd`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sphkv.cli import app
from sphkv.integrations.hf import save_trace

runner = CliRunner()


@pytest.fixture(scope="module")
def trace_file(small_trace, tmp_path_factory):
    return save_trace(small_trace, tmp_path_factory.mktemp("cli") / "tiny.safetensors")


@pytest.mark.parametrize("method", ["greedy", "lp", "ilp"])
def test_solve_trace_json(trace_file, small_trace, method):
    result = runner.invoke(app, ["solve", str(trace_file), "--budget", "0.4", "--method", method,
                                 "--time-limit", "20", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["items"] == small_trace.layers * small_trace.kv_heads * small_trace.tokens
    assert summary["cost"] <= summary["budget"] + 1e-6
    assert summary["budget"] == pytest.approx(0.4 * summary["full_cost"])
    shares = summary["byte_shares"]
    assert len(shares["per_layer"]) == 2 and len(shares["per_head"][0]) == 2
    assert sum(shares["per_layer"]) == pytest.approx(1.0)
    assert sum(shares["bytes_per_layer"]) == pytest.approx(summary["cost"])


def test_solve_trace_table_and_estimator(trace_file):
    result = runner.invoke(app, ["solve", str(trace_file), "--budget", "40%",
                                 "--estimator", "keydiff"])
    assert result.exit_code == 0, result.output
    assert "byte shares" in result.output and "head 1" in result.output


def test_solve_trace_errors(trace_file, tmp_path):
    result = runner.invoke(app, ["solve", str(trace_file), "--estimator", "nope"])
    assert result.exit_code == 2 and "unknown estimator 'nope'" in result.output
    result = runner.invoke(app, ["solve", str(trace_file), "--budget", "0.01"])
    assert result.exit_code == 2 and "below the cheapest" in result.output
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(trace_file.read_bytes()[:500])
    result = runner.invoke(app, ["solve", str(broken)])
    assert result.exit_code == 2 and "truncated or corrupt" in result.output
