"""Helpers shared by the kernel tests."""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """‖out − ref‖ / ‖ref‖ ≤ ratio, NaN never passing; prints the error it saw."""
    assert not out.isnan().any(), f"{name}: NaN in output (an element was not written)"
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    print(f"{name}: relative error {err:.3g} (limit {ratio})")
    assert err <= ratio, f"{name}: relative error {err:.3g} > {ratio}"
