"""The ``sphkv`` command."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="sphkv: rate-distortion allocation and compression of the KV cache.",
    no_args_is_help=True,
    add_completion=False,
)


def main() -> None:
    app()
