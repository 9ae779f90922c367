"""Issue 7: `python train.py` end to end — the embedded default's full run directory — and the
precision and memory switches on the CPU."""

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_runs import (
    ENVIRONMENT,
    STEPS,
    TRAIN,
    exported_weights,
    losses,
    metrics,
    output,
    run_setup,
    same_tensors,
    train_args,
)

import minidream.models.layers
import train
from minidream import load_pipeline
from minidream.config import TINY
from minidream.models.pipeline import random_pipeline
from minidream.training.config_file import load_train_config
from minidream.training.data import DataError
from minidream.training.example_subject import write_example_subject

METRIC_FIELDS = {"step", "loss", "loss_instance", "loss_prior", "lr", "grad_norm", "samples_per_s"}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`python train.py` with only its output and data folders moved into a temporary folder."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    overrides = [f"run.output_dir={run_dir}", f"data.class_dir={run_dir}/class-images"]
    result = subprocess.run(
        [sys.executable, TRAIN, *overrides], capture_output=True, text=True, env=ENVIRONMENT, cwd=run_dir.parent, timeout=600
    )
    assert result.returncode == 0, output(result)
    return run_dir, overrides, result


def test_default_run_writes_the_full_run_directory(default_run):
    run_dir, overrides, result = default_run
    assert load_train_config(run_dir / "config.yaml", []) == load_train_config(train.DEFAULT_CONFIG, overrides)
    assert len(list((run_dir / "example-subject").glob("*.png"))) == 4
    assert len(list((run_dir / "class-images").glob("*.png"))) == 8  # generated: the folder started empty

    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 101))
    assert all(METRIC_FIELDS <= r.keys() and all(math.isfinite(r[k]) for k in METRIC_FIELDS - {"step"}) for r in records)
    first, last = (sum(r["loss"] for r in part) / 10 for part in (records[:10], records[-10:]))
    assert last < 0.7 * first  # it learns

    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000050", "step-00000100"]
    for step in (50, 100):  # a grid of the two validation prompts, one 64x64 image each
        assert Image.open(run_dir / "samples" / f"step-{step:08d}.png").size == (128, 64)

    export = run_dir / "model.safetensors"
    pipe = load_pipeline(export)
    trained = load_file(run_dir / "checkpoints" / "step-00000100" / "unet.safetensors")
    assert same_tensors(pipe.unet.state_dict(), trained)
    initial = random_pipeline(TINY, seed=0)  # the frozen parts leave as they came
    assert same_tensors(pipe.text_encoder.state_dict(), initial.text_encoder.state_dict())
    assert same_tensors(pipe.vae.state_dict(), initial.vae.state_dict())

    assert f"done: 100 steps. Fine-tuned model: {export}" in result.stdout
    assert f"metrics: {run_dir / 'metrics.jsonl'}" in result.stdout and f"samples: {run_dir / 'samples'}" in result.stdout


def test_bf16_autocast_trains_on_the_cpu(tmp_path, training_data, uninterrupted):
    run_dir = tmp_path / "run"
    result = run_setup(run_dir, training_data, "single", "train.mixed_precision=bf16", "train.max_steps=4")
    assert result.returncode == 0, output(result)
    bf16, fp32 = losses(run_dir), losses(uninterrupted("single"))
    assert not any(r["skipped"] for r in metrics(run_dir))
    # bf16 keeps 8 bits of mantissa: close to the fp32 losses, and not equal (autocast was on).
    assert all(abs(bf16[s] - fp32[s]) < 0.02 * fp32[s] and bf16[s] != fp32[s] for s in bf16)
    unet = load_pipeline(run_dir / "model.safetensors").unet.state_dict()
    assert all(torch.isfinite(w).all() for w in unet.values())
    assert same_tensors(unet, load_file(run_dir / "checkpoints" / "step-00000004" / "unet.safetensors"))


def test_gradient_checkpointing_gives_the_same_training(tmp_path, training_data, uninterrupted, monkeypatch, one_thread):
    """Run in-process to count the recomputed blocks: the switch must really be on."""
    calls = []
    recompute = minidream.models.layers.recompute_in_backward
    monkeypatch.setattr(minidream.models.layers, "recompute_in_backward",
                        lambda *args, **kwargs: calls.append(1) or recompute(*args, **kwargs))
    run_dir = tmp_path / "run"
    assert train.main(train_args(run_dir, training_data, ("train.batch_size=2", "train.gradient_checkpointing=true"))) == 0
    assert len(calls) >= STEPS  # blocks were checkpointed in every step
    assert losses(run_dir) == losses(uninterrupted("single"))
    assert same_tensors(exported_weights(run_dir), exported_weights(uninterrupted("single")))


REAL_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dreambooth" / "dog"


def folder_contents(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_the_default_config_with_your_photos_trains_on_them_and_never_writes_to_their_folder(tmp_path):
    """Issue 13: `python train.py data.instance_dir=photos/my-dog` once drew the example subject's
    PNGs into the user's folder and trained on them mixed with the photos."""
    before = folder_contents(REAL_PHOTOS)
    run_dir = tmp_path / "run"
    overrides = [f"data.instance_dir={REAL_PHOTOS}", f"run.output_dir={run_dir}", f"data.class_dir={tmp_path / 'class'}",
                 "data.num_class_images=2", "train.max_steps=2", "checkpoint.every_n_steps=2", "validation.every_n_steps=2"]
    result = subprocess.run([sys.executable, TRAIN, *overrides], capture_output=True, text=True, env=ENVIRONMENT,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0, output(result)
    assert folder_contents(REAL_PHOTOS) == before
    assert not (run_dir / "example-subject").exists()
    saved = load_train_config(run_dir / "config.yaml", [])
    assert saved.data.instance_dir == str(REAL_PHOTOS) and not saved.data.example_subject
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]


def test_the_example_subject_is_never_drawn_into_a_folder_holding_other_images(tmp_path):
    (tmp_path / "mine.jpg").write_bytes((REAL_PHOTOS / "00.jpg").read_bytes())
    with pytest.raises(DataError, match=r"mine.jpg.*not drawing the example subject there"):
        write_example_subject(tmp_path, count=4, size=64)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.jpg"]
