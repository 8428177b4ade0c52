"""Rate-distortion curves of allocations: distortion against budget, per solver."""

from __future__ import annotations

from pathlib import Path

__all__ = ["BUDGET_FRACTIONS", "plot_rate_distortion", "solver_sweep"]

BUDGET_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)


def solver_sweep(problem, fractions=BUDGET_FRACTIONS, ilp_time_limit: float = 10.0,
                 on_step=None, on_skip=None) -> list[dict]:
    """Every registered solver at each budget (a fraction of the all-fp16 cost).

    Returns one summary row per (budget, solver) with ``budget_fraction`` added. ``on_step(label)``
    is called before each solve, ``on_skip(fraction, error)`` for a budget below the cheapest
    feasible assignment (skipped).
    """
    from sphkv.rdr import InfeasibleBudgetError
    from sphkv.solvers import SOLVERS, solve

    rows = []
    for fraction in fractions:
        try:
            at_budget = problem.with_budget(fraction * problem.full_cost())
        except InfeasibleBudgetError as exc:
            if on_skip is not None:
                on_skip(fraction, exc)
            continue
        for method in SOLVERS:
            if on_step is not None:
                on_step(f"budget 1/{round(1 / fraction)}: {method}")
            alloc = solve(at_budget, method,
                          time_limit=ilp_time_limit if method == "ilp" else None)
            rows.append(alloc.summary() | {"budget_fraction": fraction,
                                           "items": at_budget.n_items})
    return rows


def plot_rate_distortion(rows: list[dict], path: str | Path, title: str) -> Path:
    """Draw distortion vs budget (fraction of fp16) for each method, with proven lower bounds.

    ``rows`` need keys ``method``, ``budget_fraction``, ``distortion`` and ``lower_bound``.
    Left: distortion, with the best lower bound at each budget as a shaded floor no allocation
    can go below. Right: each method's distortion above that floor, in percent — an upper bound
    on how far it is from the optimum.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    markers = "os^DvP*"
    fractions = sorted({r["budget_fraction"] for r in rows})
    floor = {f: max(r["lower_bound"] for r in rows if r["budget_fraction"] == f)
             for f in fractions}
    for k, method in enumerate(methods):
        pts = sorted((r["budget_fraction"], r["distortion"]) for r in rows if r["method"] == method)
        style = {"marker": markers[k % len(markers)], "label": method, "alpha": 0.85}
        ax.plot(*zip(*pts), **style)
        # Distance above the best proven bound, floored at 1e-4 % to show on a log axis.
        above = [max((d - floor[f]) / max(d, 1e-300), 1e-6) * 100 for f, d in pts]
        ax_gap.plot([f for f, _ in pts], above, **style)
    ax.fill_between(fractions, 0, [floor[f] for f in fractions], color="0.85",
                    label="below best proven bound")
    ax.set_yscale("log")
    ax.set_ylabel("total expected distortion")
    ax.set_title(title)
    ax_gap.set_yscale("log")
    ax_gap.set_ylabel("distortion above best proven bound (%)")
    ax_gap.set_title("how far from optimal, at most")
    for a in (ax, ax_gap):
        a.set_xscale("log", base=2)
        a.set_xticks(fractions, [f"1/{round(1 / f)}" if f < 1 else "1" for f in fractions])
        a.set_xlabel("budget (fraction of the all-fp16 cache, pages included)")
        a.grid(True, which="both", alpha=0.3)
        a.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
