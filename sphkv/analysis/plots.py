"""Matplotlib figures (PNG, Agg backend): distortion against bits per coordinate, and RDR
against drop-only and quantize-only ladders at equal bytes."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["RDR_COLOR", "plot_attention_error", "plot_logit_distortion", "plot_rdr_vs_baselines"]

#: the project's own method, in every figure
RDR_COLOR = "#d62728"
_BASELINES = {"drop-only": ("#1f77b4", "s"), "quantize-only": ("#2ca02c", "^")}
_RDR_LABELS = {"greedy": "RDR (greedy)", "ilp": "RDR exact (ilp)", "lp": "RDR (lp, rounded)"}

_XMAX = 9.0  # fp16 (16 bits) is off the chart; its error is below 1e-3


def _families(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        if row["bits_per_coord"] <= _XMAX:
            out.setdefault(row["family"], []).append(row)
    return {f: sorted(r, key=lambda row: row["bits_per_coord"]) for f, r in out.items()}


def plot_logit_distortion(rows: list[dict], path: Path, d: int) -> Path:
    """Two panels against bits per coordinate: RMS normalised logit error (predicted vs measured
    on random and real keys) and worst case (analytic bound vs measured maximum)."""
    fig, (ax_rms, ax_max) = plt.subplots(1, 2, figsize=(13, 5), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (family, group) in zip(colors, _families(rows).items(), strict=False):
        x = [r["bits_per_coord"] for r in group]
        ax_rms.plot(x, [r["random_rms"] for r in group], "o-", color=color, label=family)
        ax_rms.plot(x, [r["predicted_rms"] for r in group], "--", color=color, alpha=0.7)
        ax_max.plot(x, [r["random_max"] for r in group], "o-", color=color, label=family)
        bound = [r["bound"] if math.isfinite(r["bound"]) else math.nan for r in group]
        ax_max.plot(x, bound, "--", color=color, alpha=0.7)
        if "real_rms" in group[0]:
            ax_rms.plot(x, [r["real_rms"] for r in group], "s:", color=color, mfc="none")
            ax_max.plot(x, [r["real_max"] for r in group], "s:", color=color, mfc="none")
    ax_rms.set_title(f"RMS of |q·k − q·k̂| / (‖q‖‖k‖), d={d}\n"
                     "solid: random keys, dashed: analytic prediction, squares: SmolLM2 keys")
    ax_max.set_title("worst case ‖k − k̂‖ / ‖k‖ (= max over q)\n"
                     "solid: max over random keys, dashed: analytic bound, squares: SmolLM2")
    for ax in (ax_rms, ax_max):
        ax.set_yscale("log")
        ax.set_xlabel("bits per coordinate (side information included)")
        ax.grid(True, which="both", alpha=0.3)
    ax_max.set_ylim(top=3)
    ax_rms.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attention_error(rows: list[dict], path: Path, ladder: list[dict] | None = None) -> Path:
    """Attention-output relative error against bits per coordinate (keys and values averaged) on
    real keys, values and queries; ``ladder`` rows (name, bits_per_coord, attention_error) are
    marked as the default tiers."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for family, group in _families(rows).items():
        ax.plot([r["bits_per_coord"] for r in group], [r["attention_error"] for r in group],
                "o-", label=family)
    for tier in ladder or []:
        marker = "kx" if tier["name"].startswith("ada") else "k*"
        ax.plot(tier["bits_per_coord"], tier["attention_error"], marker, ms=14, mfc="none")
        ax.annotate(tier["name"], (tier["bits_per_coord"], tier["attention_error"]),
                    textcoords="offset points", xytext=(6, 6), fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("bits per coordinate, keys and values averaged (side information included)")
    ax.set_ylabel("mean ‖o − ô‖ / ‖o‖")
    ax.set_title("attention-output error on SmolLM2-135M K/V/Q (Austen prefill)\n"
                 "stars: default tier ladder, crosses: ADA-key tiers (ada_tiers)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rdr_vs_baselines(rows: list[dict], path: Path, title: str) -> Path:
    """Distortion against bytes for RDR (the full tier ladder) and the drop-only and
    quantize-only ladders at the same budgets; right: how many times RDR's distortion each
    baseline has.

    ``rows`` need ``method`` (a solver name, ``drop-only`` or ``quantize-only``),
    ``budget_fraction`` and ``distortion``; greedy is RDR's line, ilp its exact optimum.
    """
    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    fractions = sorted({r["budget_fraction"] for r in rows})
    by = {(r["method"], r["budget_fraction"]): r["distortion"] for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in sorted(methods, key=lambda m: m in _RDR_LABELS):  # RDR drawn last, on top
        pts = [(f, by[method, f]) for f in fractions if (method, f) in by]
        x, y = [100 * f for f, _ in pts], [d for _, d in pts]
        if method in _BASELINES:
            color, marker = _BASELINES[method]
            ax.plot(x, y, marker=marker, ls="--", color=color, lw=1.8, label=method)
            ratio = [(100 * f, d / by["greedy", f]) for f, d in pts
                     if by.get(("greedy", f), 0) > 0]
            if ratio:
                ax_ratio.plot(*zip(*ratio), marker=marker, ls="--", color=color, lw=1.8,
                              label=f"{method} / RDR")
        elif method == "greedy":
            ax.plot(x, y, "o-", color=RDR_COLOR, lw=3, ms=7, label=_RDR_LABELS[method])
        else:
            ax.plot(x, y, "x" if method == "ilp" else "+", color="black", ms=10,
                    label=_RDR_LABELS.get(method, method))
    ax_ratio.axhline(1, color=RDR_COLOR, lw=3, label="RDR")
    for a in (ax, ax_ratio):
        handles, labels = a.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: not labels[i].startswith("RDR"))
        a.legend([handles[i] for i in order], [labels[i] for i in order])
        a.set_xscale("log", base=2)
        a.set_xticks([100 * f for f in fractions], [f"{100 * f:g}%" for f in fractions])
        a.set_xlabel("cache bytes, % of the all-fp16 cache (pages included)")
        a.grid(True, which="both", alpha=0.3)
    ax.set_yscale("log")
    ax.set_ylabel("total expected attention distortion (lower is better)")
    ax.set_title(title, fontsize=10)
    ax_ratio.set_yscale("log")
    ax_ratio.set_ylabel("baseline distortion / RDR distortion (×)")
    ax_ratio.set_title("RDR against each baseline at equal bytes", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
