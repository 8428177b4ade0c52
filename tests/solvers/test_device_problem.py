"""A problem whose per-item arrays are torch tensors (``AllocationProblem.to``): evaluated and
solved where they are, with the host problem's answers."""

import numpy as np
import pytest
import torch

from sphkv.rdr import AllocationProblem, synthetic_problem
from sphkv.solvers import available_solvers, solve

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _problem(case: str) -> AllocationProblem:
    problem = synthetic_problem(layers=3, kv_heads=5, tokens=97, sinks=4, recent=8, seed=7,
                                page_size=None if case == "no-pages" else 16,
                                budget_fraction=0.3)
    if case == "ceiling":
        ceiling = np.where(np.arange(problem.n_items) % 3 == 0, 2, -1)
        ceiling[problem.forced >= 0] = -1
        problem = AllocationProblem(problem.distortion, problem.cost, problem.budget,
                                    groups=problem.groups, page_size=problem.page_size,
                                    page_overhead=problem.page_overhead, forced=problem.forced,
                                    ceiling=ceiling)
    if case == "per-item-cost":
        cost = np.broadcast_to(problem.cost, problem.distortion.shape).copy()
        cost[:, 1:] += (np.arange(problem.n_items) % 4)[:, None]
        problem = AllocationProblem(problem.distortion, cost, problem.budget * 1.1)
    return problem


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["pages", "no-pages", "ceiling", "per-item-cost"])
def test_greedy_on_the_device_equals_the_host_solve(device, case):
    host = _problem(case)
    moved = host.to(device)
    assert moved.device.type == device and host.device is None
    for polish in (False, True):
        expected = solve(host, "greedy", polish=polish)
        got = solve(moved, "greedy", polish=polish)
        assert isinstance(got.tiers, torch.Tensor) and got.tiers.device == moved.device
        np.testing.assert_array_equal(got.tiers.cpu().numpy(), expected.tiers)
        assert got.distortion == pytest.approx(expected.distortion, rel=1e-12)
        assert got.lower_bound == pytest.approx(expected.lower_bound, rel=1e-12)
        assert got.cost == expected.cost and got.status == expected.status
        assert got.price == pytest.approx(expected.price, rel=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_backends_and_devices_meet_the_problem_where_it_is(device):
    host = _problem("pages")
    moved = host.to(device)
    expected = solve(host, "greedy").tiers
    # a device problem solved on the host, and a host problem on the device, come back where
    # the caller's problem lives
    on_host = solve(moved, "greedy", backend="numpy").tiers
    assert on_host.device == moved.device
    np.testing.assert_array_equal(on_host.cpu().numpy(), expected)
    to_device = solve(host, "greedy", backend="torch", device=device).tiers
    assert isinstance(to_device, np.ndarray)
    np.testing.assert_array_equal(to_device, expected)


@pytest.mark.parametrize("method", [m for m in ("lp", "ilp") if m in available_solvers()])
def test_other_solvers_solve_the_host_copy(method):
    host = synthetic_problem(layers=1, kv_heads=2, tokens=24, page_size=4, sinks=2, recent=2,
                             seed=2, budget_fraction=0.3)
    got = solve(host.to("cpu"), method)
    assert isinstance(got.tiers, torch.Tensor)
    expected = solve(host, method)
    assert got.distortion == pytest.approx(expected.distortion, rel=1e-9)
    assert host.is_feasible(got.tiers.numpy())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["pages", "no-pages", "ceiling", "per-item-cost"])
def test_evaluations_equal_the_host_ones(device, case):
    host = _problem(case)
    moved = host.to(device)
    rng = np.random.default_rng(3)
    tiers = np.minimum(rng.integers(0, host.n_tiers, host.n_items), host.ceiling_tier)
    tiers[host.forced >= 0] = host.forced[host.forced >= 0]
    on = torch.as_tensor(tiers, device=device)
    np.testing.assert_array_equal(moved.counts(on), host.counts(tiers))
    np.testing.assert_array_equal(moved.forced_counts(), host.forced_counts())
    assert moved.cost_of(on) == host.cost_of(tiers)
    assert moved.distortion_of(on) == pytest.approx(host.distortion_of(tiers), rel=1e-12)
    assert moved.is_feasible(on, cost=0.0) and host.is_feasible(tiers, cost=0.0)
    for item in np.flatnonzero(host.forced >= 0)[:1]:
        wrong = tiers.copy()
        wrong[item] = 0  # a forced item off its tier
        assert not moved.is_feasible(torch.as_tensor(wrong, device=device), cost=0.0)
    assert moved.min_cost() == host.min_cost() and moved.full_cost() == host.full_cost()
    np.testing.assert_array_equal(moved.min_cost_tiers().cpu().numpy(), host.min_cost_tiers())
    with pytest.raises(ValueError, match="tiers must lie in"):
        moved.cost_of(torch.full((host.n_items,), host.n_tiers, device=device))
    with pytest.raises(ValueError, match="tiers must have shape"):
        moved.distortion_of(on[:-1])


def test_moves_copy_and_come_back_read_only():
    host = _problem("ceiling")
    moved = host.to("cpu")
    moved.distortion[0, 0] = 1e9  # the host problem's arrays are not shared
    assert host.distortion[0, 0] != 1e9
    back = moved.host()
    assert isinstance(back.distortion, np.ndarray) and back.device is None
    assert not back.distortion.flags.writeable and not back.groups.flags.writeable
    np.testing.assert_array_equal(back.ceiling, host.ceiling)
    np.testing.assert_array_equal(back.group_index, host.group_index)
    assert host.host() is host
    cheaper = host.to("cpu").with_budget(host.budget / 2)
    assert cheaper.device == torch.device("cpu") and cheaper.budget == host.budget / 2


def test_a_problem_on_its_device_is_solved_where_it_is(monkeypatch):
    moved = _problem("pages").to("cpu")
    monkeypatch.setattr(AllocationProblem, "to", lambda *_: pytest.fail("the problem moved"))
    monkeypatch.setattr(AllocationProblem, "host", lambda *_: pytest.fail("the problem moved"))
    # (the whole-page bound and the polish, which run on the host, left out)
    tiers = solve(moved, "greedy", backend="torch", device="cpu", polish=False, bound=False).tiers
    assert tiers.device == moved.device
