"""`sphkv solve` on a trace, `sphkv plot rd`, and `eval` and `generate` on a tiny model."""

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


def test_plot_rd(trace_file, tmp_path):
    png = tmp_path / "rd.png"
    result = runner.invoke(app, ["plot", "rd", str(trace_file), "--out", str(png),
                                 "--ilp-time-limit", "5"])
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 0
    rows = json.loads(png.with_suffix(".json").read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert {"greedy", "lp", "ilp", "drop-only", "quantize-only"} <= methods
    # the tiny trace forces 20 of 96 tokens to fp16: 1/16 and 1/8 are infeasible
    assert "skipped" in result.output
    by = {(r["method"], r["budget_fraction"]): r["distortion"] for r in rows}
    for f in {r["budget_fraction"] for r in rows if r["method"] == "greedy"}:
        # the full ladder can do what either restricted ladder does
        for ladder in ("drop-only", "quantize-only"):
            if (ladder, f) in by:
                assert by[("ilp", f)] <= by[(ladder, f)] * (1 + 1e-6)


def test_eval_on_a_short_text_names_its_own_options(tmp_path, tiny_dir):
    text = tmp_path / "short.txt"
    text.write_text("A short text. " * 10)
    result = runner.invoke(app, ["eval", "--task", "ppl", "--model", str(tiny_dir), "--text",
                                 str(text), "--context", "1024"])
    message = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "--context 1024" in message and "--tokens" not in message


def test_generate_compare_prints_the_fp16_text_beside(tmp_path, tiny_dir):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("It is a truth universally acknowledged, that a single man " * 3)
    result = runner.invoke(app, ["generate", "--model", str(tiny_dir), "--prompt-file",
                                 str(prompt), "--budget", "50%", "--max-new-tokens", "6",
                                 "--window", "8", "--compare", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert isinstance(out["text_fp16"], str) and out["new_tokens"] == 6


def test_generate_reports_a_recalling_methods_host_copy(tmp_path, tiny_dir):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("It is a truth universally acknowledged, that a single man " * 3)
    args = ["generate", "--model", str(tiny_dir), "--prompt-file", str(prompt), "--budget",
            "50%", "--max-new-tokens", "40", "--window", "8"]
    out = {}
    for method in ("rdr-kv", "rdr-kv-recall"):
        result = runner.invoke(app, [*args, "--method", method, "--json"])
        assert result.exit_code == 0, result.output
        out[method] = json.loads(result.stdout)
    assert out["rdr-kv"]["host_bytes"] == 0
    # every token that left the window (all but the last 8 to 16 seen), fp16 keys and
    # values of 2 layers, 2 kv-heads, 16 dimensions, in buffers that double when full
    per_token = 2 * 2 * 16 * 2 * 2
    tokens = out["rdr-kv-recall"]["prompt_tokens"] + 39
    assert per_token * (tokens - 16) <= out["rdr-kv-recall"]["host_bytes"] <= 2 * per_token * tokens
    result = runner.invoke(app, [*args, "--method", "rdr-kv-recall"])
    assert "outside the budget" in result.output


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_sensitive_method_runs_from_the_command_line(tmp_path, tiny_dir, command):
    """The CLIs calibrate the head weights a sensitive method needs (on the shipped text)."""
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man " * 20)
    args = (["eval", "--task", "ppl", "--text", str(text), "--context", "256", "--scored",
             "16", "--budget", "50%"] if command == "eval" else
            ["generate", "--prompt-file", str(text), "--budget", "50%", "--max-new-tokens", "4",
             "--window", "8"])
    result = runner.invoke(app, [*args, "--model", str(tiny_dir), "--method", "rdr-kv-fisher",
                                 "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "rdr-kv-fisher"
