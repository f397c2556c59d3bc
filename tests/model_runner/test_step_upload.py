"""One host-to-device copy per step: the views hold each list's values, in its own range."""

from __future__ import annotations

import torch

from model_runner.step_upload import upload_ints


def test_each_list_comes_back_as_its_own_int64_view():
    parts = [[3, 1, 4], [], [1, 5], [9]]
    got = upload_ints(parts, torch.device("cpu"))
    assert [t.tolist() for t in got] == parts
    assert all(t.dtype == torch.long and t.is_contiguous() for t in got)
    got[0][1] = 7  # NOTE: the runner fills placeholder inputs in place
    assert [t.tolist() for t in got[1:]] == parts[1:]
