"""The command as a new user meets it: fast help, every bad argument refused with one line
(exit 2, the argument named, no traceback) before any model loads, readable output."""

import ast
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sphkv import cli
from sphkv.cli import app
from sphkv.rdr import synthetic_problem

runner = CliRunner()


def test_help_does_not_import_torch():
    code = ("import sys\nfrom sphkv.cli import main\n"
            "for args in (['--help'], ['generate', '--help'], ['plot', 'rd', '--help']):\n"
            "    sys.argv = ['sphkv', *args]\n"
            "    try:\n        main()\n    except SystemExit as exc:\n"
            "        assert exc.code == 0, exc.code\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'matplotlib')"
            " if m in sys.modules)\n"
            "print('heavy:', heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "heavy: []" in done.stdout


def test_registry_names_match_the_registries():
    # in a fresh process: benchmarks (rdr_ablation) add variants to METHODS at run time
    code = ("from sphkv.integrations.hf.tasks import NONE, SETTINGS\n"
            "from sphkv.rdr import ESTIMATORS\n"
            "from sphkv.rdr.methods import METHODS\n"
            "from sphkv.solvers import SOLVERS\n"
            "print(repr((tuple(SOLVERS), tuple(ESTIMATORS), tuple(METHODS), NONE, "
            "tuple(SETTINGS))))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert ast.literal_eval(done.stdout.strip()) == (
        cli.SOLVER_NAMES, cli.ESTIMATOR_NAMES, cli.METHOD_NAMES, cli.NONE, cli.SETTINGS)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: argument errors must come first."""
    import sphkv.integrations.hf.model as model

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(model, "load_model", refuse)


def _refused(args, hint):
    result = runner.invoke(app, args)
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert hint in text, text
    return text


@pytest.fixture
def prompt(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("It is a truth universally acknowledged")
    return str(path)


@pytest.mark.parametrize("args, hint", [
    (["--budget", "abc"], "--budget"),
    (["--budget", "1.5"], "ambiguous"),
    (["--budget", "0"], "--budget"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--window", "0"], "--window"),
    (["--method", "zip"], "--method"),
    (["--model", "./no/such/model.gguf"], "--model"),
], ids=["budget-text", "budget-ambiguous", "budget-zero", "new-tokens", "window", "method",
        "missing-gguf"])
def test_generate_refuses_bad_arguments_before_loading(no_model_load, prompt, args, hint):
    _refused(["generate", "--prompt-file", prompt, *args], hint)


def test_unknown_model_offline_is_one_line(no_model_load, prompt, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    text = _refused(["generate", "--prompt-file", prompt, "--model", "nobody/no-such-model"],
                    "--model")
    assert "offline" in text


@pytest.mark.parametrize("args, hint", [
    (["--task", "mmlu"], "--task"),
    (["--context", "0"], "--context"),
    (["--depth", "2"], "--depth"),
    (["--budget", "2"], "ambiguous"),
    (["--setting", "aware"], "--setting"),
])
def test_eval_refuses_bad_arguments_before_loading(no_model_load, prompt, args, hint):
    base = ["eval", "--task", "ppl", "--text", prompt]
    _refused([*base, *args], hint)


@pytest.fixture(scope="module")
def problem_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("first-use") / "p.npz"
    synthetic_problem(layers=2, kv_heads=2, tokens=64, recent=8, budget_fraction=0.5).save(path)
    return path


def test_solve_refuses_a_text_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a problem")
    _refused(["solve", str(text)], "expected a problem (.npz) or a KV trace (.safetensors)")


def test_plot_rd_names_a_problem_file_as_such(problem_file, tmp_path):
    _refused(["plot", "rd", str(problem_file), "--out", str(tmp_path / "rd.png")],
             "`sphkv solve` takes it")


def test_plot_rd_out_in_a_missing_folder(tmp_path):
    trace = tmp_path / "t.safetensors"
    trace.write_bytes(b"")
    _refused(["plot", "rd", str(trace), "--out", str(tmp_path / "absent" / "rd.png")], "--out")


def test_infeasible_budget_in_whole_bytes_with_what_to_change(problem_file):
    text = _refused(["solve", str(problem_file), "--budget", "0.001"], "raise --budget to")
    assert "e+" not in text and "bytes are needed" in text


def test_demo_refuses_a_file_as_its_folder(tmp_path):
    path = tmp_path / "f"
    path.write_text("")
    _refused(["demo", "--synthetic", "--out-dir", str(path)], "--out-dir")


def test_tables_wrap_instead_of_truncating(problem_file, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # narrower than the table
    result = runner.invoke(app, ["solve", str(problem_file), "--budget", "0.5"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert "feasibl" in result.output and "distor" in result.output


def test_progress_prints_lines_when_piped(capsys):
    from rich.console import Console

    out = Console(file=sys.stderr, force_terminal=False)
    with cli.progress(out) as bar:
        task = bar.add_task("step", total=3)
        for k in range(3):
            bar.update(task, description=f"step {k}", advance=1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("[3/3] step 2")


def test_budget_takes_explicit_units():
    from sphkv.integrations.hf.generate import budget_bytes

    assert budget_bytes(None, 1, 1, bytes=3e6) == 3e6
    with pytest.raises(TypeError, match="exactly one of fraction="):
        budget_bytes(None, 1, 1)
    with pytest.raises(TypeError, match="exactly one of fraction="):
        budget_bytes(None, 1, 1, fraction=0.5, bytes=10)
    with pytest.raises(ValueError, match="for a byte count pass bytes="):
        budget_bytes(None, 1, 1, fraction=1.5)
    with pytest.raises(ValueError, match="bytes must be > 0"):
        budget_bytes(None, 1, 1, bytes=0)


def test_demo_default_folder_is_outside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cli._default_demo_dir() == tmp_path / "sphkv-demo"
    assert not str(cli._default_demo_dir()).startswith(os.getcwd())
