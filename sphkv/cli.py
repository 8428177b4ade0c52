"""The ``sphkv`` command."""

from __future__ import annotations

import typer

from sphkv.analysis.cli import plot_app

app = typer.Typer(
    help="sphkv: rate-distortion allocation and compression of the KV cache.",
    no_args_is_help=True,
    add_completion=False,
)

app.add_typer(plot_app, name="plot")


def main() -> None:
    app()
