"""Shared helpers for benchmarks: units, the printed table and the JSON beside it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def gbps(nbytes: float, seconds: float) -> float:
    """Achieved bandwidth in GB/s (1 GB = 1e9 bytes)."""
    return nbytes / 1e9 / seconds


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """Date, commit and device, for the header of every result. The commit is ``SPHKV_COMMIT``
    where that is set (a copy of the working tree whose git metadata is not the code's), else
    the checkout's."""
    commit = os.environ.get("SPHKV_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True,
                                          check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    device = f"{_cpu_name()} ({os.cpu_count()} cores)"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name()
    except ImportError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "device": device, "python": platform.python_version()}


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of ``rows``; floats get 4 significant digits; fields holding lists (a
    series per row) stay in the JSON only."""
    if not rows:
        return "(no rows)"
    columns = columns or [k for k, v in rows[0].items() if not isinstance(v, list)]

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(op: str, rows: list[dict], extra: dict | None = None,
               out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{op}.json"
    path.write_text(json.dumps({"op": op, **environment(), **(extra or {}), "rows": rows},
                               indent=2))
    return path
