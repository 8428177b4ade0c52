"""Matplotlib figures of distortion against bits per coordinate (PNG, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_logit_distortion", "plot_attention_error"]

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
