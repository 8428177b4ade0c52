"""Tier ladder and the ``sphkv plot bits`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sphkv.cli import app
from sphkv.codec import Fp16Codec, Int8Codec
from sphkv.rdr import Tier, TierSet, ada_tiers, default_tiers


@pytest.mark.parametrize("d", [64, 128])
def test_default_ladder(d):
    tiers = default_tiers(d)
    assert tiers.names == ["drop", "turbo2", "turbo3", "turbo4", "int8", "fp16"]
    costs = tiers.costs
    assert costs[0] == 0 and costs[-1] == 4 * d and np.all(np.diff(costs) > 0)
    # ~2, ~3, ~4 and 8 bits per coordinate, keys and values together
    np.testing.assert_allclose(costs[1:5] * 8 / (2 * d), [2, 3, 4, 8], atol=0.3)
    for tier in tiers.tiers[1:]:
        assert tier.bytes_per_token_head == (tier.key.bytes_per_vector
                                             + tier.value.bytes_per_vector)
    assert tiers.index("turbo3") == 2 and tiers.d == d
    # the ADA-key ladder fits in the same bytes
    ada = ada_tiers(d)
    assert ada.names[1:4] == ["ada2", "ada3", "ada4"]
    assert np.all(ada.costs <= costs) and np.all(ada.costs >= costs - 2)


def test_tierset_errors():
    fp16, int8 = Tier("fp16", Fp16Codec(d=64), Fp16Codec(d=64)), Tier("int8", Int8Codec(d=64),
                                                                       Int8Codec(d=64))
    with pytest.raises(ValueError, match="strictly increasing"):
        TierSet((Tier("drop"), fp16, int8))
    with pytest.raises(ValueError, match="unique names"):
        TierSet((Tier("drop"), Tier("drop")))
    with pytest.raises(ValueError, match="share one head dimension"):
        TierSet((Tier("drop"), int8, Tier("fp16", Fp16Codec(d=128), Fp16Codec(d=128))))
    with pytest.raises(ValueError, match="both be codecs"):
        Tier("half", key=Fp16Codec(d=64))
    with pytest.raises(KeyError, match="no tier named 'int4'"):
        default_tiers().index("int4")


@pytest.mark.slow
def test_plot_bits_random_only(tmp_path):
    result = CliRunner().invoke(app, ["plot", "bits", "--out-dir", str(tmp_path), "--no-real",
                                      "--keys", "256", "--queries", "16"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "logit_distortion.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "bits.json").read_text())
    assert {r["family"] for r in data["key_codecs"]} >= {"ADA (polar, rotated)", "TurboQuant"}
    assert "| family |" in (tmp_path / "bits.md").read_text()
