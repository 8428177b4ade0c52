"""Fixtures of the rdr tests: a tiny random-weight Llama trace and the real SmolLM2 trace."""

import pytest

from tests.integrations.fixtures import real_trace, tiny_trace


@pytest.fixture(scope="session")
def small_trace():
    return tiny_trace()


@pytest.fixture(scope="session")
def smollm2_trace():
    return real_trace()
