"""Training-state checkpoints: complete or absent, rotated, refused when they do not fit."""

import errno
import random

import numpy as np
import pytest
import torch

from minidream.training import checkpoint
from minidream.training.checkpointer import list_checkpoints, resolve_resume, rotate
from minidream.training.order import Cursor


def trainer_state(seed=0, trained=("unet",)):
    """A TrainerState around a small model that has taken one AdamW step."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 ** s)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    lr_schedule.step()
    return checkpoint.TrainerState(
        modules={"unet": model}, optimizer=optimizer, lr_schedule=lr_schedule,
        scaler=torch.amp.GradScaler("cpu", enabled=False), setup={"architecture": "tiny", "trained": list(trained)},
    )


def save(run_dir, step, state):
    state.step = step
    return checkpoint.save_checkpoint(run_dir, state, [checkpoint.capture_rng()])


def test_round_trip_restores_the_whole_trainer_state(tmp_path):
    state = trainer_state()
    state.cursor, state.nonfinite_run = Cursor(epoch=3, position=2), 1
    path = save(tmp_path, 5, state)
    assert path.name == "step-00000005" and sorted(p.name for p in path.iterdir()) == [
        "checksums.json", "optimizer.pt", "trainer.pt", "unet.safetensors"]
    assert checkpoint.damage(path) is None  # every file there, as checksummed
    other = trainer_state(seed=1)
    checkpoint.load_checkpoint(path, other, rank=0)
    assert (other.step, other.cursor, other.nonfinite_run) == (5, Cursor(3, 2), 1)
    model, restored = state.modules["unet"], other.modules["unet"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
    exp_avg = state.optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(other.optimizer.state_dict()["state"][0]["exp_avg"], exp_avg)
    assert other.lr_schedule.state_dict() == state.lr_schedule.state_dict()


def test_a_different_setup_is_refused(tmp_path):
    path = save(tmp_path, 1, trainer_state())
    with pytest.raises(checkpoint.CheckpointError, match=r"written with trained=\['unet'\] but this run has trained=\['text_encoder', 'unet'\]"):
        checkpoint.load_checkpoint(path, trainer_state(trained=("text_encoder", "unet")), rank=0)


def test_failed_write_leaves_the_previous_checkpoint_and_no_partial_one(tmp_path, monkeypatch):
    state = trainer_state()
    first = save(tmp_path, 1, state)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(checkpoint.CheckpointError, match=r"step-00000002 \(No space left on device\); the previous checkpoint is intact"):
        save(tmp_path, 2, state)
    assert list_checkpoints(tmp_path) == [first]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert resolve_resume("latest", list_checkpoints(tmp_path)) == first


def test_incomplete_checkpoints_are_ignored_with_a_warning(tmp_path):
    good = save(tmp_path, 3, trainer_state())
    (tmp_path / "checkpoints" / "step-00000004.tmp").mkdir()
    with pytest.warns(UserWarning, match="ignoring incomplete checkpoint .*step-00000004.tmp"):
        assert resolve_resume("latest", list_checkpoints(tmp_path)) == good


def test_rotation_keeps_the_newest_and_clears_partial_writes(tmp_path):
    state = trainer_state()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, state)
    (tmp_path / "checkpoints" / "step-00000002.tmp").mkdir()
    rotate(tmp_path, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    rotate(tmp_path, keep_last=0)  # never deletes the newest complete checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004"]


def test_resolve_resume(tmp_path):
    assert resolve_resume("none", []) is None
    assert resolve_resume("latest", []) is None  # nothing yet: start fresh
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint folder"):
        resolve_resume(str(tmp_path / "nope"), [])
    path = save(tmp_path, 7, trainer_state())
    assert resolve_resume(str(path), []) == path and resolve_resume("latest", [path]) == path


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    path = save(tmp_path, 1, trainer_state())
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    state = torch.load(path / "trainer.pt", weights_only=True)
    checkpoint.restore_rng(state["rng"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
