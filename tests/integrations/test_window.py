"""The window chosen by the budget (``window=None``): the rule, the budget held, a given window
honoured, compressed copies choosing their own, and bad arguments refused."""

import pytest
import torch

from sphkv.integrations.hf.cache import (
    WINDOW_GROW_SHARE,
    WINDOW_LONG,
    WINDOW_MAX,
    WINDOW_SHARE,
    WINDOW_SHORT,
    SphkvCache,
    register_attention,
)
from sphkv.integrations.hf.config import cache_argument
from sphkv.integrations.hf.generate import fp16_cache_bytes
from sphkv.integrations.hf.tasks import perplexity_runs

from .fixtures import TINY, tiny_model
from .test_cache import _generate, _ids


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _reserve(batch: int, window: int) -> int:
    """2W fp16 tokens (keys and values) per layer and kv-head, and 8 bytes of padding offset
    per sequence."""
    per_token = TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * 4 * TINY["head_dim"]
    return batch * (2 * window * per_token + 8)


@pytest.mark.parametrize("batch", [1, 3])
def test_the_budget_chooses_the_short_window_where_the_long_ones_reserve_is_dear(model, batch):
    edge = _reserve(batch, WINDOW_LONG) / WINDOW_SHARE  # the long reserve is then a sixth of it
    for budget, window in ((edge, WINDOW_LONG), (edge - 1, WINDOW_SHORT),
                           (2 * edge, WINDOW_LONG), (edge / 3, WINDOW_SHORT)):
        cache = SphkvCache(model.config, budget, window=None)
        assert cache.window is None
        assert cache.budget_window(batch) == window
        assert cache.reserved_bytes(batch) == cache.reserved_bytes(batch, window)
    # a deferred cache holds its whole prompt: the long window bounds its buffers
    assert SphkvCache(model.config, None, window=None).budget_window(batch) == WINDOW_LONG


@pytest.mark.parametrize("batch", [1, 3])
def test_the_budget_doubles_the_window_where_the_reserve_is_cheap(model, batch):
    # each doubling from where the doubled window's reserve is a sixteenth of the budget, up
    # to WINDOW_MAX, no more
    window = WINDOW_LONG
    while window < WINDOW_MAX:
        edge = _reserve(batch, 2 * window) / WINDOW_GROW_SHARE
        for budget, chosen in ((edge - 1, window), (edge, 2 * window)):
            assert SphkvCache(model.config, budget, window=None).budget_window(batch) == chosen
        window *= 2
    assert WINDOW_MAX == 256
    edge = _reserve(batch, WINDOW_MAX) / WINDOW_GROW_SHARE
    assert SphkvCache(model.config, 1000 * edge, window=None).budget_window(batch) == WINDOW_MAX


def test_a_given_window_is_honoured_whatever_the_budget(model):
    edge = _reserve(1, WINDOW_LONG) / WINDOW_SHARE
    for window in (4, 8, 16, 32):
        for budget in (edge / 3, 10 * edge):
            assert SphkvCache(model.config, budget, window=window).window == window


@pytest.mark.parametrize("fraction, window", [(0.3, WINDOW_SHORT), (0.9, WINDOW_LONG)])
def test_a_window_chosen_by_the_budget_generates_as_that_window_given(model, fraction, window):
    ids, new = _ids(200, seed=2), 60
    budget = fraction * fp16_cache_bytes(model.config, 1, 200 + new)
    out, cache = _generate(model, ids, budget, new=new, window=None)
    assert cache.window == window
    assert cache.peak_bytes <= budget
    ref, given = _generate(model, ids, budget, new=new, window=window)
    assert torch.equal(out, ref)
    assert cache.history == given.history


def test_compressed_copies_choose_their_own_window(model):
    # one deferred prefill, copies at two budgets: each its own window, and each equal to a
    # cache that prefilled itself with the window chosen by its budget
    ids = _ids(241, seed=3)[0]
    runs = [("rdr", 0.25), ("rdr", 0.9)]
    results = perplexity_runs(model, ids, 200, 40, runs, chunk=WINDOW_SHORT, window=None,
                              page_size=4)
    for (method, fraction), r in zip(runs, results, strict=True):
        own = perplexity_runs(model, ids, 200, 40, [(method, fraction)], chunk=WINDOW_SHORT,
                              window=None, page_size=4)[0]
        assert r.nll == pytest.approx(own.nll, rel=1e-6)
        assert r.cache_bytes_peak == own.cache_bytes_peak
    shared = SphkvCache(model.config, None, "rdr", window=None, page_size=4)
    model.set_attn_implementation(register_attention())
    try:
        with torch.no_grad():
            model(ids[None, :200], **{cache_argument(model): shared}, use_cache=True)
    finally:
        model.set_attn_implementation("sdpa")
    fp16 = fp16_cache_bytes(model.config, 1, 240)
    short, long = (shared.compress("rdr", f * fp16) for f in (0.25, 0.9))
    assert (short.window, long.window) == (WINDOW_SHORT, WINDOW_LONG)
    # the prefill's items differ by window: each copy placed its own
    assert set(shared._prefill_items) == {(repr(short.method), WINDOW_SHORT),
                                          (repr(long.method), WINDOW_LONG)}
    assert short.admitted == 200 - WINDOW_SHORT and long.admitted == 200 - WINDOW_LONG


@pytest.mark.parametrize("bad", [0, -8, 2.5, "8", True])
def test_a_bad_window_is_refused_naming_it(model, bad):
    with pytest.raises(ValueError, match=r"window must be an integer >= 1 or None"):
        SphkvCache(model.config, 1e6, window=bad)


@pytest.mark.parametrize("argv, message", [
    (["--window", "0"], "argument --window: must be a positive integer or 'budget', got '0'"),
    (["--window", "eight"], "argument --window: must be a positive integer or 'budget'"),
    (["--window", "budget", "--chunk", "16"],
     "--chunk must be between 1 and --window (budget, as short as 8), got 16"),
])
def test_sweep_window_arguments(tmp_path, capsys, argv, message):
    from benchmarks.eval_sweep import main

    with pytest.raises(SystemExit):
        main(["--text", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
