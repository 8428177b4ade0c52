import numpy as np
import pytest

from sphkv.rdr import AllocationProblem, InfeasibleBudgetError

D = np.array([[4.0, 1.0, 0.0], [2.0, 1.0, 0.0], [9.0, 3.0, 0.0]])
C = np.array([0.0, 1.0, 2.0])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"distortion": np.array([[np.nan, 1.0, 0.0]] * 3)}, "distortion"),
        ({"distortion": np.array([[np.inf, 1.0, 0.0]] * 3)}, "distortion"),
        ({"distortion": -D}, "distortion"),
        ({"distortion": D[0]}, "distortion"),
        ({"cost": np.array([0.0, -1.0, 2.0])}, "cost"),
        ({"cost": np.array([0.0, 1.0])}, "cost"),
        ({"cost": np.ones((2, 3))}, "cost"),
        ({"budget": np.nan}, "budget"),
        ({"budget": "lots"}, "budget"),
        ({"groups": np.zeros(2)}, "groups"),
        ({"groups": np.array([0, -1, 0])}, "groups"),
        ({"forced": np.array([0, 3, -1])}, "forced"),
        ({"forced": np.array([0, -2, -1])}, "forced"),
        ({"forced": np.array([0, -1])}, "forced"),
        ({"page_size": 0}, "page_size"),
        ({"page_size": 2.5}, "page_size"),
        ({"page_overhead": 3.0}, "page_overhead"),
        ({"tier_names": ["drop", "fp16"]}, "tier_names"),
    ],
)
def test_bad_input_names_the_argument(kwargs, field):
    args = {"distortion": D, "cost": C, "budget": 3.0} | kwargs
    with pytest.raises(ValueError, match=field):
        AllocationProblem(**args)


def test_unequal_costs_in_a_page_group_are_refused():
    cost = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 3.0], [0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="cost rows must be equal within each group"):
        AllocationProblem(D, cost, 100.0, page_size=2)


def test_budget_below_cheapest_assignment_states_the_minimum():
    with pytest.raises(InfeasibleBudgetError, match=r"at least 4 bytes") as info:
        AllocationProblem(D, C, 3.0, forced=np.array([2, 2, -1]))
    assert info.value.min_cost == 4.0
    assert isinstance(info.value, ValueError)


def test_paged_cost_counts_whole_pages_and_overhead():
    # Group 0 has 3 items at tier 2 (2 pages), group 1 one item at tier 1 (1 page).
    p = AllocationProblem(np.zeros((4, 3)), C, 100.0, groups=[0, 0, 0, 1], page_size=2,
                          page_overhead=0.5)
    assert p.cost_of(np.array([2, 2, 2, 1])) == 2 * (2 * 2 + 0.5) + (2 * 1 + 0.5)
    assert p.cost_of(np.array([0, 0, 0, 0])) == 0.0  # drop holds no pages


def test_min_cost_fills_forced_partial_pages_first():
    # The forced item leaves one free slot in a fp16 page; the free item takes it for nothing.
    p = AllocationProblem(np.ones((2, 2)), [1.0, 2.0], 100.0, page_size=2, forced=[1, -1])
    assert p.min_cost() == 4.0
    assert list(p.min_cost_tiers()) == [1, 1]


def test_save_load_round_trip(tmp_path):
    p = AllocationProblem(D, C, 6.0, groups=[0, 1, 1], page_size=2, page_overhead=1.0,
                          forced=[-1, 2, -1], tier_names=["drop", "int4", "fp16"])
    path = tmp_path / "p.npz"
    p.save(path)
    q = AllocationProblem.load(path)
    for field in ("distortion", "cost", "groups", "forced"):
        np.testing.assert_array_equal(getattr(p, field), getattr(q, field))
    assert (q.budget, q.page_size, q.page_overhead, q.tier_names) == (
        6.0, 2, 1.0, ["drop", "int4", "fp16"])
    assert AllocationProblem.load(path, budget=50.0).budget == 50.0


def test_load_rejects_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a .npz archive"):
        AllocationProblem.load(bad)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, distortion=D)
    with pytest.raises(ValueError, match="missing arrays"):
        AllocationProblem.load(foreign)
    with pytest.raises(FileNotFoundError):
        AllocationProblem.load(tmp_path / "absent.npz")
