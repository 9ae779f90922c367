"""Issue 16 end to end: train.py on real photos of two subjects, in mixed aspect ratios, with
buckets, a caption template, caption dropout, masks, random crops and flips all on — resumed
after SIGTERM bit for bit, the same under torchrun with 2 ranks, and per-subject losses logged;
the latent cache (data.latent_cache_dir) changes no loss."""


import pytest
import test_resume  # as modules: their tests imported by name would be collected (and run) here too
import test_train_distributed
import test_train_host_syncs
import torch
from PIL import Image
from train_runs import SETUPS, losses, metrics, output, run_setup, train_args

import train
from minidream.config import TINY
from minidream.models.pipeline import random_pipeline
from minidream.training import batches, dataset
from minidream.training.config_file import load_train_config
from minidream.training.data import load_image
from minidream.training.latent_cache import LatentCache
from minidream.training.order import Item, RankOrder
from minidream.training.plan import plan_items
from minidream.training.subjects import scan_subject, subjects_of

BUCKETS = [(48, 80), (64, 64), (80, 48)]  # data.resolution=64, data.bucket_step=16


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


def test_the_latent_cache_changes_no_loss(tmp_path, training_data, monkeypatch, one_thread):
    """Random crops and flips: each sample's transform is drawn before its moments are looked up, so a
    run filling the cache, and one reading it, lose exactly what a run without it does."""
    caches = []
    monkeypatch.setattr(dataset, "LatentCache", lambda folder, vae: caches.append(LatentCache(folder, vae)) or caches[-1])
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


def test_class_images_are_generated_at_the_bucket_sizes_and_validation_renders_at_each(tmp_path, training_data, one_thread):
    """The dog's class folder starts empty: its 4 images come in the proportions of its items'
    buckets (2 landscape, 2 square); each training size gets a validation grid of its own."""
    classes = tmp_path / "new-dog-classes"
    subjects = SETUPS["subjects"].overrides[:]
    overrides = [o.replace("<data>/class-dog", str(classes)) for o in subjects]
    overrides += ["train.max_steps=1", "validation.prompts=[a photo of sks dog]", "validation.every_n_steps=1", "validation.steps=2",
                  "data.class_steps=2"]
    assert train.main(train_args(tmp_path / "run", training_data, tuple(overrides))) == 0
    assert sorted(Image.open(p).size for p in classes.glob("class-*.png")) == [(64, 64), (64, 64), (80, 48), (80, 48)]
    grids = {p.name: Image.open(p).size for p in (tmp_path / "run" / "samples").glob("*.png")}
    # Two prompts (the cat's instance prompt joins, as no prompt names zwx), side by side.
    assert grids == {"step-00000001-48x80.png": (96, 80), "step-00000001-64x64.png": (128, 64), "step-00000001-80x48.png": (160, 48)}


def test_images_are_decoded_per_batch_not_held(training_data, monkeypatch):
    """Memory stays flat: setting up decodes nothing; each batch decodes its own images, and with
    the in-memory moments (centred crops, no flips) an image is decoded once."""
    decoded = []
    monkeypatch.setattr(batches, "load_image", lambda path: decoded.append(path) or load_image(path))
    cfg = load_train_config(train.DEFAULT_CONFIG, [o.replace("<data>", str(training_data)) for o in SETUPS["subjects"].overrides])
    subjects = subjects_of(cfg)
    instances = [scan_subject(s, cfg.data, BUCKETS) for s in subjects]
    plan = plan_items([s.name for s in subjects], instances, [1, 1], [0, 0], BUCKETS, 64, 2)
    source = batches.LatentSource(random_pipeline(TINY, seed=0).vae, True, False, 0.18215, batches.MomentsInMemory())
    made = batches.DreamBoothBatches(plan, source, seed=0, caption_dropout=0.0, masks=False)
    assert decoded == []
    order = RankOrder(plan, seed=0, rank=0, world_size=1).of_epoch(0)
    for epoch in range(2):
        for j in range(0, len(order), 2):
            made.batch([Item(order[j], epoch, j), Item(order[j + 1], epoch, j + 1)])
    assert sorted(decoded) == sorted(e.path for e in plan.instances)  # 8 images, each once over two epochs


def test_buckets_subjects_and_masks_make_no_host_read_inside_a_step(tmp_path, training_data, monkeypatch, one_thread):
    """The per-subject losses go through the one-hot matrix on the device, masks are host tensors
    copied over with the batch. (Caption dropout and random flips read their CPU generator's draw
    on the host, as data.random_flip always has: no GPU wait, but the count would see them.)"""
    deterministic = [o.replace("<data>", str(training_data)) for o in SETUPS["subjects"].overrides
                     if o.split("=")[0] not in ("data.caption_dropout", "data.random_flip", "data.center_crop")]
    assert test_train_host_syncs.reads_inside_steps(tmp_path / "run", training_data, monkeypatch, tuple(deterministic)) == 0
    assert "loss/cat" in metrics(tmp_path / "run")[-1] or "loss/dog" in metrics(tmp_path / "run")[-1]


def test_resuming_with_other_buckets_or_subjects_is_refused(tmp_path, training_data, capsys, one_thread):
    """The checkpoint's cursor points into the data order that buckets and subjects decide: a resume
    that changes them would silently train other samples, so it is refused, naming both settings."""
    overrides = (*SETUPS["subjects"].overrides, "train.max_steps=2", "checkpoint.every_n_steps=2")
    assert train.main(train_args(tmp_path / "run", training_data, overrides)) == 0
    other_buckets = (*overrides, "data.max_aspect=1.75", "train.max_steps=4", "run.resume=latest")
    assert train.main(train_args(tmp_path / "run", training_data, other_buckets)) == 2
    error = capsys.readouterr().err
    assert "data=" in error and "'buckets': [64, 16, 1.75]" in error and "resume with the same setup" in error
