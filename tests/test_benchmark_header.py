"""The header every benchmark result carries."""

from benchmarks.common import environment


def test_commit_from_the_checkout_unless_set(monkeypatch):
    monkeypatch.delenv("SPHKV_COMMIT", raising=False)
    checkout = environment()["commit"]
    monkeypatch.setenv("SPHKV_COMMIT", "abc1234")
    header = environment()
    assert header["commit"] == "abc1234" != checkout
    assert {"date", "device", "python"} <= set(header)


def test_printed_tables_leave_series_to_the_json():
    from benchmarks.common import format_table

    table = format_table([{"method": "rdr", "tok_s": 12.3456, "steps_ms": [1.0, 2.0]}])
    assert table.splitlines()[0] == "| method | tok_s |"
    assert "12.35" in table and "steps_ms" not in table
