"""benchmarks.revision_profile: a recalling method's revisions timed by their parts."""

import pytest
import torch

from benchmarks.revision_profile import PARTS, main, profile


def test_every_timed_revision_is_split_into_its_parts():
    torch.set_num_threads(1)
    runs = profile("smollm2", 128, "rdr-kv-recall", 0.25, 2, torch.device("cpu"))
    assert set(runs) == set(PARTS)
    assert all(len(values) == 2 for values in runs.values())  # the first is left out
    for i in range(2):
        measured = [runs[p][i] for p in ("rows", "items", "solve", "writes")]
        assert min(measured) >= 0 and runs["rows"][i] > 0 and runs["solve"][i] > 0
        # the parts are calls inside the revision: they fit in its time
        assert sum(measured) <= runs["total"][i]


def test_refuses_methods_that_do_not_revise(capsys):
    with pytest.raises(SystemExit):
        main(["--method", "rdr-kv", "--context", "128"])
    assert "invalid choice: 'rdr-kv'" in capsys.readouterr().err
