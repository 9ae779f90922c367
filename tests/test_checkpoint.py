"""Training-state checkpoints: complete or absent, rotated, refused when they do not fit."""

import errno
import random

import numpy as np
import pytest
import torch

from minidream.training import checkpoint


def model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(run_dir, step, model, optimizer):
    state = {"step": step, "setup": {"architecture": "tiny", "trained": ["unet"]}, "rng": [checkpoint.capture_rng()]}
    return checkpoint.save_checkpoint(run_dir, step, {"unet": model}, optimizer, state)


def test_round_trip_restores_weights_and_optimizer(tmp_path):
    model, optimizer = model_and_optimizer()
    path = save(tmp_path, 5, model, optimizer)
    assert path.name == "step-00000005" and sorted(p.name for p in path.iterdir()) == ["optimizer.pt", "trainer.pt", "unet.safetensors"]
    other, other_opt = model_and_optimizer(seed=1)
    state = checkpoint.load_checkpoint(path, {"unet": other}, other_opt, {"architecture": "tiny", "trained": ["unet"]})
    assert state["step"] == 5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    exp_avg = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], exp_avg)


def test_a_different_setup_is_refused(tmp_path):
    model, optimizer = model_and_optimizer()
    path = save(tmp_path, 1, model, optimizer)
    with pytest.raises(checkpoint.CheckpointError, match=r"written with trained=\['unet'\] but this run has trained=\['text_encoder', 'unet'\]"):
        checkpoint.load_checkpoint(path, {"unet": model}, optimizer, {"trained": ["text_encoder", "unet"]})


def test_failed_write_leaves_the_previous_checkpoint_and_no_partial_one(tmp_path, monkeypatch):
    model, optimizer = model_and_optimizer()
    first = save(tmp_path, 1, model, optimizer)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(checkpoint.CheckpointError, match=r"step-00000002 \(No space left on device\); the previous checkpoint is intact"):
        save(tmp_path, 2, model, optimizer)
    assert checkpoint.list_checkpoints(tmp_path) == [first]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert checkpoint.resolve_resume(tmp_path, "latest") == first


def test_incomplete_checkpoints_are_ignored_with_a_warning(tmp_path):
    model, optimizer = model_and_optimizer()
    good = save(tmp_path, 3, model, optimizer)
    (tmp_path / "checkpoints" / "step-00000004.tmp").mkdir()
    with pytest.warns(UserWarning, match="ignoring incomplete checkpoint .*step-00000004.tmp"):
        assert checkpoint.resolve_resume(tmp_path, "latest") == good


def test_rotation_keeps_the_newest_and_clears_partial_writes(tmp_path):
    model, optimizer = model_and_optimizer()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, optimizer)
    (tmp_path / "checkpoints" / "step-00000002.tmp").mkdir()
    checkpoint.rotate(tmp_path, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    checkpoint.rotate(tmp_path, keep_last=0)  # never deletes the newest complete checkpoint
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000004"]


def test_resolve_resume(tmp_path):
    assert checkpoint.resolve_resume(tmp_path, "none") is None
    assert checkpoint.resolve_resume(tmp_path, "latest") is None  # nothing yet: start fresh
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint folder"):
        checkpoint.resolve_resume(tmp_path, str(tmp_path / "nope"))
    model, optimizer = model_and_optimizer()
    path = save(tmp_path, 7, model, optimizer)
    assert checkpoint.resolve_resume(tmp_path, str(path)) == path


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    model, optimizer = model_and_optimizer()
    path = save(tmp_path, 1, model, optimizer)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    state = torch.load(path / "trainer.pt", weights_only=True)
    checkpoint.restore_rng(state["rng"][0])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
