"""metrics.jsonl writing, truncation on resume, and the optional TensorBoard mirror."""

import json
import sys

import pytest

from minidream.training.metrics import MetricsLog


def test_records_append_and_truncate_after_a_resumed_step(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 0.1 * step})
    log.truncate_after(2)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_tensorboard_is_a_warning_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.warns(UserWarning, match=r"tensorboard is not installed \(pip install tensorboard\)"):
        log = MetricsLog(tmp_path, tensorboard=True)
    log.write({"step": 1, "loss": 0.5})
    log.close()
    assert (tmp_path / "metrics.jsonl").exists()
