"""Kernel tests run their Triton kernels on the CPU through the interpreter when no GPU is there.

``TRITON_INTERPRET`` must be set before the first ``@triton.jit`` runs, so it is set here, before
any kernel module is imported by the tests.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def nan_empty(monkeypatch):
    """``torch.empty``/``empty_like`` return NaN-filled float tensors inside the test, so an
    output element a kernel leaves unwritten fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
