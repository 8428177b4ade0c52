"""The header every benchmark result carries."""

from benchmarks.common import environment


def test_commit_from_the_checkout_unless_set(monkeypatch):
    monkeypatch.delenv("SPHKV_COMMIT", raising=False)
    checkout = environment()["commit"]
    monkeypatch.setenv("SPHKV_COMMIT", "abc1234")
    header = environment()
    assert header["commit"] == "abc1234" != checkout
    assert {"date", "device", "python"} <= set(header)
