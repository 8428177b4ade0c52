"""The vectorised fill equals the plain sequential scan it replaces."""

import array_api_compat
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sphkv.solvers.greedy import _fill


def sequential_fill(item, step, dc, left, n_taken, broken_item):
    """The definition: scan in order, take a segment if it is its item's next and fits."""
    n_taken = n_taken.copy()
    blocked = {broken_item}
    for i, s, c in zip(item.tolist(), step.tolist(), dc.tolist()):
        if i in blocked:
            continue
        if s == n_taken[i] and c <= left:
            left -= c
            n_taken[i] += 1
        else:
            blocked.add(i)
    return n_taken


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.integers(0, 40),
       st.floats(0, 30), st.sampled_from(["numpy", "torch"]))
def test_fill_matches_sequential_scan(seed, n_items, n_candidates, left, backend):
    rng = np.random.default_rng(seed)
    item = rng.integers(0, n_items, n_candidates)
    step = rng.integers(0, 4, n_candidates)
    dc = rng.integers(1, 10, n_candidates).astype(float)
    n_taken = rng.integers(0, 3, n_items)
    broken = int(rng.integers(0, n_items))
    expected = sequential_fill(item, step, dc, left, n_taken, broken)
    if backend == "numpy":
        xp = array_api_compat.array_namespace(np.empty(0))
        got = n_taken.copy()
        _fill(xp, item, step, dc, left, got, broken)
    else:
        xp = array_api_compat.array_namespace(torch.empty(0))
        got_t = torch.as_tensor(n_taken.copy())
        _fill(xp, torch.as_tensor(item), torch.as_tensor(step), torch.as_tensor(dc), left,
              got_t, broken)
        got = got_t.numpy()
    np.testing.assert_array_equal(got, expected)
