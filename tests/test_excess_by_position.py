"""benchmarks.excess_by_position: a method's excess over none per block of scored positions."""

import json

import numpy as np
import pytest

from benchmarks.excess_by_position import excess_by_block, main


def _rows():
    rows = []
    for text, span, shift in (("a", 0, 0.0), ("b", 0, 2.0)):
        base = np.linspace(1.0, 2.0, 10)
        rows.append(dict(text=text, task="ppl", context=64, span=span, method="none",
                         budget=1.0, token_nll=base.tolist()))
        rows.append(dict(text=text, task="ppl", context=64, span=span, method="m",
                         budget=0.125, token_nll=(base + np.arange(10) + shift).tolist()))
    # a cell without its none cell is left out
    rows.append(dict(text="c", task="ppl", context=64, span=0, method="m", budget=0.125,
                     token_nll=[9.0] * 10))
    return rows


def test_blocks_are_the_paired_excess_averaged():
    out = excess_by_block(_rows(), "m", block=4)
    # excess per position: arange(10) + the shifts' mean 1.0; blocks of 4, 4 and 2
    np.testing.assert_allclose(out[64], [2.5, 6.5, 9.5])


def test_nothing_to_pair_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="no perplexity cell of method 'x'"):
        excess_by_block(_rows(), "x")
    with pytest.raises(ValueError, match="no perplexity cell"):
        excess_by_block(_rows(), "m", budget=0.25)
    with pytest.raises(ValueError, match="block must be >= 1"):
        excess_by_block(_rows(), "m", block=0)
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"rows": _rows()}))
    main([str(path), "--method", "m", "--block", "5"])
    assert "blocks of 5 positions: 3.0000 8.0000" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([str(path), "--method", "x"])
    assert exit_info.value.code == 2
