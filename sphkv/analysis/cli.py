"""The body of ``sphkv plot bits``: regenerate the distortion figures and tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from sphkv.analysis.distortion import (
    attention_error,
    describe,
    key_codecs,
    label,
    logit_errors,
    pair_codecs,
)
from sphkv.analysis.plots import plot_attention_error, plot_logit_distortion

__all__ = ["bits"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return "∞" if math.isinf(v) else f"{v:.4g}"
    return str(v)


def _markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def bits(out_dir: Path, d: int = 64, keys: int = 4096, queries: int = 256, real: bool = True,
         tokens: int = 1024, window: int = 64, seed: int = 0, threads: int = 0) -> None:
    """Logit distortion vs bits per coordinate for every key codec (analytic bound, analytic
    RMS prediction, measured max/mean/RMS on random and real keys) and attention-output error vs
    bits per coordinate for key/value codec pairs on real K/V. Writes logit_distortion.png,
    attention_error.png, bits.json and bits.md into ``out_dir``."""
    from sphkv.cli import fail, progress
    from sphkv.rdr.tiers import ada_tiers, default_tiers

    if threads:
        torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    rand_k = torch.randn(keys, d, generator=gen)
    rand_q = torch.randn(queries, d, generator=gen)
    codecs = key_codecs(d)
    trace = None
    with progress() as bar:
        if real:
            from sphkv.analysis.real import austen_text, capture_kv, load_model

            task = bar.add_task("loading SmolLM2 and prefilling", total=None)
            model, tok = load_model()
            trace = capture_kv(model, tok, austen_text(chars=12 * tokens), tokens)
            del model
            bar.update(task, total=1, completed=1)
            if trace.keys.shape[-1] != d:
                fail(f"--d {d} differs from the model's head dim {trace.keys.shape[-1]}")
            # per kv-head: its group's queries of the last `window` positions
            real_q = trace.queries[:, :, -window:].reshape(
                trace.keys.shape[0], trace.keys.shape[1], -1, d)
        rows = []
        task = bar.add_task("key codecs", total=len(codecs))
        for family, codec in codecs:
            row = {"family": family, **describe(codec)}
            stats = logit_errors(codec, rand_k, rand_q)
            row.update(random_max=stats.max, random_mean=stats.mean, random_rms=stats.rms)
            if trace is not None:
                stats = logit_errors(codec, trace.keys, real_q)
                row.update(real_max=stats.max, real_mean=stats.mean, real_rms=stats.rms)
            rows.append(row)
            bar.advance(task)
        plot_logit_distortion(rows, out_dir / "logit_distortion.png", d)
        pairs, ladder = [], []
        if trace is not None:
            tiers = [(t.name, t.key, t.value) for t in default_tiers(d) if not t.is_drop]
            tiers += [(t.name, t.key, t.value) for t in ada_tiers(d).tiers[1:4]]
            todo = pair_codecs(d)
            task = bar.add_task("attention error", total=len(todo) + len(tiers))

            def measure(kc, vc) -> dict:
                err = sum(attention_error(kc, vc, trace.keys[layer], trace.values[layer],
                                          trace.queries[layer, :, -window:])
                          for layer in range(trace.keys.shape[0])) / trace.keys.shape[0]
                return {"key": label(kc), "value": label(vc),
                        "bytes": kc.bytes_per_vector + vc.bytes_per_vector,
                        "bits_per_coord": (kc.bits_per_coordinate + vc.bits_per_coordinate) / 2,
                        "attention_error": err}

            for family, kc, vc in todo:
                pairs.append({"family": family, **measure(kc, vc)})
                bar.advance(task)
            for name, kc, vc in tiers:
                ladder.append({"name": name, **measure(kc, vc)})
                bar.advance(task)
            plot_attention_error(pairs, out_dir / "attention_error.png", ladder)
    (out_dir / "bits.json").write_text(json.dumps(
        {"d": d, "keys": keys, "queries": queries, "tokens": tokens if real else None,
         "window": window, "seed": seed, "key_codecs": rows, "pairs": pairs, "ladder": ladder},
        indent=1))
    cols = ["family", "codec", "bits_per_coord", "bound", "predicted_rms", "random_max",
            "random_mean", "random_rms"]
    if trace is not None:
        cols += ["real_max", "real_mean", "real_rms"]
    text = "## Logit distortion per key codec\n\n" + _markdown(rows, cols) + "\n"
    if pairs:
        cols = ["family", "key", "value", "bytes", "bits_per_coord", "attention_error"]
        text += "\n## Attention-output error per (key, value) codec pair\n\n"
        text += _markdown(pairs, cols) + "\n\n## Default tier ladder (and ADA-key tiers)\n\n"
        text += _markdown(ladder, ["name", "key", "value", "bytes", "bits_per_coord",
                                   "attention_error"]) + "\n"
    (out_dir / "bits.md").write_text(text)
    print(f"wrote {out_dir}/logit_distortion.png, attention_error.png, bits.json, bits.md")
