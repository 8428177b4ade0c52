"""Kernel test fixtures. ``TRITON_INTERPRET`` (kernels on the CPU when there is no GPU) is set in
``tests/conftest.py``: Triton reads it when first imported, which other tests may cause.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty``/``empty_like`` return NaN-filled float tensors inside the test, so an
    output element a kernel leaves unwritten fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
