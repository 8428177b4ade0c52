"""Fixtures of the Hugging Face integration tests."""

import pytest

from .fixtures import real_trace, save_tiny, tiny_model, tiny_trace


@pytest.fixture(scope="session")
def tiny():
    return tiny_model()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def small_trace():
    return tiny_trace()


@pytest.fixture(scope="session")
def smollm2_trace():
    return real_trace()
