"""Issue 16 end to end: train.py on real photos of two subjects, in mixed aspect ratios, with
buckets, a caption template, caption dropout, masks, random crops and flips all on — resumed
after SIGTERM bit for bit, the same under torchrun with 2 ranks, and per-subject losses logged;
the latent cache (data.latent_cache_dir) changes no loss."""

import hashlib
import sys
import types

import pytest
import test_resume  # as modules: their tests imported by name would be collected (and run) here too
import test_train_distributed
import torch
from safetensors.torch import load, save
from train_runs import SETUPS, losses, metrics, output, run_setup, train_args

import train


def test_buckets_two_subjects_dropout_and_masks_resume_after_sigterm_bit_identically(tmp_path, training_data, uninterrupted):
    test_resume.test_sigterm_then_resume("subjects", tmp_path, training_data, uninterrupted)


def test_buckets_two_subjects_dropout_and_masks_two_ranks_train_what_one_process_does(uninterrupted):
    test_train_distributed.test_two_ranks_train_the_weights_one_process_does_with_the_global_batch(
        "subjects", "torchrun-subjects", uninterrupted
    )
    one, two = metrics(uninterrupted("subjects")), metrics(uninterrupted("torchrun-subjects"))
    for a, b in zip(one, two):
        assert {k for k in a if k.startswith("loss/")} == {k for k in b if k.startswith("loss/")}
        assert all(abs(a[k] - b[k]) <= test_train_distributed.LOG_TOLERANCE * abs(a[k]) for k in a if k.startswith("loss/"))


def test_per_subject_losses_average_to_the_instance_loss(uninterrupted, training_data):
    """Batch 2, one instance sample per row of the one-hot matrix: a step of one subject logs its
    loss as the instance loss; a step of both logs two losses whose mean is the instance loss."""
    records = metrics(uninterrupted("subjects"))
    seen = set()
    for record in records:
        per_subject = {k: v for k, v in record.items() if k.startswith("loss/")}
        assert per_subject and set(per_subject) <= {"loss/dog", "loss/cat"}
        seen |= set(per_subject)
        if len(per_subject) == 1:
            assert next(iter(per_subject.values())) == pytest.approx(record["loss_instance"], rel=1e-6)
        else:
            assert sum(per_subject.values()) / 2 == pytest.approx(record["loss_instance"], rel=1e-6)
    assert seen == {"loss/dog", "loss/cat"}
    log = output(run_setup(uninterrupted("subjects") / "again", training_data, "subjects", "train.max_steps=1"))
    assert "bucket 48x80: 2 items" in log and "bucket 64x64: 4 items" in log and "bucket 80x48: 2 items" in log


class DiskMoments:
    """A stand-in for latent_cache.LatentCache (another branch's module) with its API: entries in a
    folder, written and read back as safetensors, keyed by the file's bytes and the transform."""

    def __init__(self, folder, vae):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def moments(self, image_path, transform_key, encode):
        key = hashlib.sha256(image_path.read_bytes() + transform_key.encode()).hexdigest()
        entry = self.folder / f"{key}.safetensors"
        if entry.exists():
            self.hits += 1
            stored = load(entry.read_bytes())
            return stored["mean"], stored["std"]
        self.misses += 1
        mean, std = encode()
        entry.write_bytes(save({"mean": mean.contiguous(), "std": std.contiguous()}))
        return mean, std


def test_the_latent_cache_changes_no_loss(tmp_path, training_data, monkeypatch, one_thread):
    """Random crops and flips: each sample's transform is drawn before its moments are looked up, so a
    run filling the cache, and one reading it, lose exactly what a run without it does."""
    caches = []
    fake = types.ModuleType("minidream.training.latent_cache")
    fake.LatentCache = lambda folder, vae: caches.append(DiskMoments(folder, vae)) or caches[-1]
    monkeypatch.setitem(sys.modules, "minidream.training.latent_cache", fake)
    overrides = (*SETUPS["subjects"].overrides, "train.max_steps=4")
    assert train.main(train_args(tmp_path / "plain", training_data, overrides)) == 0
    cached = (*overrides, f"data.latent_cache_dir={tmp_path / 'cache'}")
    assert train.main(train_args(tmp_path / "filling", training_data, cached)) == 0
    assert train.main(train_args(tmp_path / "reading", training_data, cached)) == 0
    plain = losses(tmp_path / "plain")
    assert len(plain) == 4 and losses(tmp_path / "filling") == plain and losses(tmp_path / "reading") == plain
    # 4 steps of 2 instance + 2 class samples; the second run finds every one of them.
    assert (caches[0].misses, caches[1].hits, caches[1].misses) == (16, 16, 0)


def test_in_memory_moments_change_no_loss(tmp_path, training_data, one_thread):
    """train.cache_latents (centred crops, no flips) encodes each image once; the losses are those of
    encoding every time."""
    overrides = (*SETUPS["subjects"].overrides, "data.random_flip=false", "data.center_crop=true", "train.max_steps=3")
    assert train.main(train_args(tmp_path / "kept", training_data, overrides)) == 0
    assert train.main(train_args(tmp_path / "encoded", training_data, (*overrides, "train.cache_latents=false"))) == 0
    assert losses(tmp_path / "kept") == losses(tmp_path / "encoded")
    assert torch.isfinite(torch.tensor(list(losses(tmp_path / "kept").values()))).all()
