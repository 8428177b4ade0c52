"""Benchmark runner: ``python -m benchmarks.run --op solvers [op options]``.

Each op lives in ``benchmarks/ops/<op>.py`` with ``add_arguments(parser)`` and ``run(args) ->
list[dict]`` (and optionally ``summarize(rows) -> str``, a condensed table, and
``result_name(args) -> str``, the file's name where it depends on the options). The runner
prints the rows as a table and writes them, with date, commit and device, to
``benchmarks/results/<op>.json``; ``--from-json`` prints the tables of a saved result again.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
from pathlib import Path

from benchmarks import ops
from benchmarks.common import environment, format_table, write_json


def main(argv: list[str] | None = None) -> None:
    available = sorted(m.name for m in pkgutil.iter_modules(ops.__path__))
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--op", choices=available)
    known, _ = pre.parse_known_args(argv)
    parser = argparse.ArgumentParser(description=__doc__, parents=[pre],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where the JSON goes (default: benchmarks/results)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="print the tables of a saved result instead of running")
    if known.op is None:
        parser.print_help()
        sys.exit(2)
    module = importlib.import_module(f"benchmarks.ops.{known.op}")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        env, rows = saved, saved["rows"]
    else:
        env = environment()
        rows = module.run(args)
        if not rows:  # a run that only exercised the op (e.g. for a profiler) writes nothing
            print(f"{known.op}: no rows, nothing written")
            return
    print(f"# {known.op} — {env['date']} — commit {env['commit']} — {env['device']}")
    print(format_table(rows))
    if hasattr(module, "summarize"):
        print("\n" + module.summarize(rows))
    if args.from_json is None:
        name = module.result_name(args) if hasattr(module, "result_name") else known.op
        path = write_json(name, rows, out_dir=args.out_dir)
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
