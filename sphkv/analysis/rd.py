"""Rate-distortion curves of allocations: distortion against budget, per solver."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_rate_distortion"]


def plot_rate_distortion(rows: list[dict], path: str | Path, title: str) -> Path:
    """Draw distortion vs budget (fraction of fp16) for each method, with proven lower bounds.

    ``rows`` need keys ``method``, ``budget_fraction``, ``distortion`` and ``lower_bound``.
    The best lower bound at each budget is drawn once, as a shaded floor: no allocation can
    sit below it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    markers = "os^DvP*"
    for k, method in enumerate(methods):
        pts = sorted((r["budget_fraction"], r["distortion"]) for r in rows if r["method"] == method)
        ax.plot(*zip(*pts), marker=markers[k % len(markers)], label=method, alpha=0.85)
    fractions = sorted({r["budget_fraction"] for r in rows})
    floor = [max(r["lower_bound"] for r in rows if r["budget_fraction"] == f) for f in fractions]
    ax.fill_between(fractions, 0, floor, color="0.85", label="below best proven bound")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(fractions, [f"1/{round(1 / f)}" if f < 1 else "1" for f in fractions])
    ax.set_xlabel("budget (fraction of the all-fp16 cache, pages included)")
    ax.set_ylabel("total expected distortion")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
