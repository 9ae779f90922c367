"""Issue 8: each way a run can fail says what happened and what to do, and loses nothing:
earlier checkpoints, metrics and the resolved config stay as they were."""

import contextlib
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from train_runs import (
    STEPS,
    checkpoint_names,
    exported_weights,
    losses,
    metrics,
    output,
    run_setup,
    run_with_failing_save,
    same_tensors,
    train_args,
)

import train
from minidream.config import TINY, TrainConfig, ValidationSection
from minidream.diffusion.sampling import generate, image_grid
from minidream.models.pipeline import random_pipeline


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if train.py gets as far as loading a model."""

    def load_models(*args):
        raise AssertionError("a model was loaded before the problem was reported")

    monkeypatch.setattr(train, "load_models", load_models)


def files(folder):
    return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_unwritable_output_dir_is_reported_before_any_model_loads(tmp_path, training_data, no_model_loading, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    code = train.main(train_args(blocker / "run", training_data))
    assert code == 2
    assert f"error: run.output_dir {blocker / 'run'} is not writable (Not a directory)" in capsys.readouterr().err
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("folder, message", [("missing", "does not exist"), ("empty", "holds no usable images")])
def test_missing_or_empty_instance_folder_is_reported_before_any_model_loads(
    folder, message, tmp_path, training_data, no_model_loading, capsys
):
    (tmp_path / "empty").mkdir()
    args = train_args(tmp_path / "run", training_data, (f"data.instance_dir={tmp_path / folder}",))
    assert train.main(args) == 2
    assert f"error: instance folder {tmp_path / folder} {message}" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing left behind but the (empty) run folder


def test_unknown_config_key_is_an_error_naming_the_nearest(tmp_path, training_data, capsys):
    assert train.main(train_args(tmp_path / "run", training_data, ("train.max_step=3",))) == 2
    assert "unknown key 'max_step'; did you mean 'max_steps'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_failed_save_is_reported_and_the_previous_checkpoint_resumes(tmp_path, training_data, uninterrupted):
    run_dir = tmp_path / "run"
    failed = run_with_failing_save(run_dir, training_data, "disk-full", 4, "checkpoint.every_n_steps=2")
    assert failed.returncode == 2, output(failed)
    assert (
        f"error: could not write checkpoint {run_dir / 'checkpoints' / 'step-00000004'} (No space left on device); "
        "the previous checkpoint is intact" in failed.stderr
    )
    assert checkpoint_names(run_dir) == ["step-00000002"]  # and no partial folder
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]

    resumed = run_setup(run_dir, training_data, "single", "run.resume=latest")
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, output(resumed)
    assert losses(run_dir) == losses(uninterrupted("single"))
    assert same_tensors(exported_weights(run_dir), exported_weights(uninterrupted("single")))


def test_resuming_with_a_different_trainable_set_is_refused(tmp_path, training_data, uninterrupted):
    run_dir = shutil.copytree(uninterrupted("single"), tmp_path / "run")
    refused = run_setup(run_dir, training_data, "single", "run.resume=latest", "train.train_text_encoder=true")
    assert refused.returncode == 2
    assert (
        f"error: {run_dir / 'checkpoints' / f'step-{STEPS:08d}'} was written with trained=['unet'] "
        "but this run has trained=['text_encoder', 'unet']; resume with the same setup or start a new run.output_dir"
        in refused.stderr
    )
    assert files(run_dir) == files(uninterrupted("single"))


def test_consecutive_non_finite_losses_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, training_data, uninterrupted):
    """An infinite prior-loss weight makes every loss infinite: the updates are skipped, and the
    second one in a row stops the run before anything is saved."""
    finished = uninterrupted("single")
    run_dir = shutil.copytree(finished, tmp_path / "run")
    extra = ("run.resume=latest", f"train.max_steps={STEPS + 10}", "train.prior_loss_weight=inf", "train.max_nonfinite_steps=2")
    stopped = run_setup(run_dir, training_data, "single", *extra)
    assert stopped.returncode == 1, output(stopped)
    assert (
        f"stopping: 2 consecutive non-finite losses at step {STEPS + 2}; the last good checkpoint is kept" in stopped.stdout
    )
    assert metrics(run_dir)[:STEPS] == metrics(finished)
    new = metrics(run_dir)[STEPS:]
    assert [r["step"] for r in new] == [STEPS + 1, STEPS + 2]
    assert all(r["skipped"] and r["loss"] is None for r in new)  # non-finite: null, as strict JSON has no NaN
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():  # every line parses as strict JSON
        json.loads(line, parse_constant=lambda name: pytest.fail(f"metrics.jsonl holds bare {name}"))
    assert files(run_dir / "checkpoints") == files(finished / "checkpoints")
    assert (run_dir / "model.safetensors").read_bytes() == (finished / "model.safetensors").read_bytes()


def test_a_fresh_run_into_a_folder_with_checkpoints_is_refused(tmp_path, training_data, no_model_loading, capsys):
    """resume=none over an earlier run would rotate the new checkpoints away behind the old ones."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-00000002").mkdir(parents=True)
    assert train.main(train_args(run_dir, training_data, ("run.resume=none",))) == 2
    assert f"{run_dir} already holds checkpoints of an earlier run; continue it with run.resume=latest" in capsys.readouterr().err


def test_unusable_class_images_already_there_are_reported_before_any_model_loads(tmp_path, training_data, no_model_loading, capsys):
    from PIL import Image

    class_dir = tmp_path / "classes"
    class_dir.mkdir()
    Image.new("RGB", (16, 16)).save(class_dir / "mine.png")
    assert train.main(train_args(tmp_path / "run", training_data, (f"data.class_dir={class_dir}",))) == 2
    assert "mine.png (16x16); use larger images or lower data.resolution" in capsys.readouterr().err


def test_show_config_prints_every_key_resolved(capsys):
    import yaml

    from minidream.config import to_dict
    from minidream.training.config_file import load_train_config

    assert train.main(["--show-config", "train.max_steps=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == to_dict(load_train_config(train.DEFAULT_CONFIG, ["train.max_steps=7"]))
    assert shown["train"]["max_steps"] == 7 and "prior_loss_weight" in shown["train"]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, training_data):
    """A finished STEPS-step run with checkpoints at STEPS / 2 and STEPS, to damage copies of."""
    run_dir = tmp_path_factory.mktemp("two-checkpoints") / "run"
    result = run_setup(run_dir, training_data, "single", f"checkpoint.every_n_steps={STEPS // 2}")
    assert result.returncode == 0, output(result)
    assert checkpoint_names(run_dir) == [f"step-{STEPS // 2:08d}", f"step-{STEPS:08d}"]
    (run_dir / "model.safetensors").unlink()  # each test's resume exports it again
    return run_dir


def damage(path, how):
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    else:  # 400 bytes overwritten inside the tensors: the file still parses, its values are garbage
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            f.write(b"\xff" * 400)


@pytest.mark.parametrize("file, how, problem", [
    ("unet.safetensors", "missing", "unet.safetensors is missing"),
    ("optimizer.pt", "truncated", "optimizer.pt does not match its checksum (damaged or truncated)"),
    ("unet.safetensors", "flipped", "unet.safetensors does not match its checksum (damaged or truncated)"),
])
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumes(
    file, how, problem, tmp_path, two_checkpoints, training_data, uninterrupted
):
    run_dir = shutil.copytree(two_checkpoints, tmp_path / "run")
    newest = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    damage(newest / file, how)
    resumed = run_setup(run_dir, training_data, "single", f"checkpoint.every_n_steps={STEPS // 2}", "run.resume=latest")
    log = output(resumed)
    assert resumed.returncode == 0, log
    assert f"warning: checkpoint {newest} is damaged ({problem}); trying the one before it" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{STEPS // 2:08d}'} at step {STEPS // 2}" in log
    assert "UserWarning" not in log  # one line, without Python's decoration
    assert losses(run_dir) == losses(uninterrupted("single"))
    assert same_tensors(exported_weights(run_dir), exported_weights(uninterrupted("single")))


def test_resume_from_a_named_damaged_checkpoint_is_one_line(tmp_path, two_checkpoints, training_data, no_model_loading, capsys):
    run_dir = shutil.copytree(two_checkpoints, tmp_path / "run")
    named = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    damage(named / "unet.safetensors", "flipped")
    assert train.main(train_args(run_dir, training_data, (f"run.resume={named}",))) == 2
    assert capsys.readouterr().err == (f"error: run.resume={named}: unet.safetensors does not match its checksum (damaged or "
                                       "truncated); resume from another checkpoints/step-* folder\n")


def test_resume_latest_without_a_checkpoint_is_an_error_naming_the_folder(tmp_path, training_data, no_model_loading, capsys):
    run_dir = tmp_path / "typo"
    assert train.main(train_args(run_dir, training_data, ("run.resume=latest",))) == 2
    assert f"error: run.resume=latest: {run_dir / 'checkpoints'} holds no complete checkpoint" in capsys.readouterr().err


def test_weights_that_turned_non_finite_are_never_exported(tmp_path, two_checkpoints, training_data, capsys, one_thread):
    """A checkpoint whose weights hold NaN (and whose checksums agree, so they were saved so):
    every step is skipped, and the run ends without writing a model."""
    from safetensors.torch import load_file, save_file

    from minidream.training.checkpoint import CHECKSUMS, write_checksums

    run_dir = shutil.copytree(two_checkpoints, tmp_path / "run")
    newest = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    weights = load_file(newest / "unet.safetensors")
    weights[next(iter(weights))].fill_(float("nan"))
    save_file(weights, newest / "unet.safetensors")
    (newest / CHECKSUMS).unlink()
    write_checksums(newest)
    assert train.main(train_args(run_dir, training_data, ("run.resume=latest", f"train.max_steps={STEPS + 2}"))) == 1
    assert "not exporting: unet." in capsys.readouterr().out
    assert not (run_dir / "model.safetensors").exists()


def test_the_last_step_gets_its_grid_and_the_final_message_names_only_what_was_written(
    tmp_path, training_data, capsys, one_thread
):
    grids = ("validation.prompts=[a photo of sks toy]", "validation.every_n_steps=2", "validation.steps=2")
    assert train.main(train_args(tmp_path / "grids", training_data, ("train.max_steps=3", *grids))) == 0
    assert sorted(p.name for p in (tmp_path / "grids" / "samples").iterdir()) == ["step-00000002.png", "step-00000003.png"]
    assert f"samples: {tmp_path / 'grids' / 'samples'}" in capsys.readouterr().out
    assert train.main(train_args(tmp_path / "plain", training_data, ("train.max_steps=1",))) == 0  # validation.prompts=[]
    printed = capsys.readouterr().out
    assert "samples:" not in printed and not (tmp_path / "plain" / "samples").exists()
    # The embedded default's try-it line: the trained size, seconds of sampling, and what random weights draw.
    assert "--height 64 --width 64 --steps 10   (random weights: expect noise" in printed


@pytest.mark.parametrize("override, message", [
    ("data.resolution=63", "error: data.resolution=63: image sides must be multiples of 8 (the VAE's downsampling); nearest: 56 or 64"),
    ("data.resolution=100", "error: data.resolution=100: image sides must be multiples of 8 (the VAE's downsampling); nearest: 96 or 104"),
    ("data.bucket_step=20", "error: data.bucket_step=20 must be a multiple of 8 (the VAE's downsampling)"),
])
def test_a_size_the_vae_cannot_take_is_one_line_before_any_model_loads(override, message, tmp_path, training_data,
                                                                          no_model_loading, capsys):
    assert train.main(train_args(tmp_path / "run", training_data, (override,))) == 2
    assert capsys.readouterr().err == message + "\n"


def test_a_full_disk_at_export_is_one_line_and_the_last_checkpoint_is_kept(tmp_path, training_data, monkeypatch, capsys, one_thread):
    """The export's writer fails as safetensors does on a full disk (not an OSError): one line naming
    the destination and the cause, exit 2, and the final checkpoint stays to export from later."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")  # as on a full tmpfs

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    run_dir = tmp_path / "run"
    assert train.main(train_args(run_dir, training_data, ("train.max_steps=2",))) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error == f"error: cannot write {run_dir / 'model.safetensors'}: No space left on device"
    assert not (run_dir / "model.safetensors").exists()
    assert checkpoint_names(run_dir) == ["step-00000002"]


def test_validation_karras_on_a_sampler_without_it_is_one_line_before_any_model_loads(
    tmp_path, training_data, no_model_loading, capsys
):
    args = train_args(tmp_path / "run", training_data, ("validation.sampler=plms", "validation.karras=true"))
    assert train.main(args) == 2
    assert capsys.readouterr().err == ("error: validation.karras: karras sigmas apply only to the euler, heun, lms, "
                                       "dpmpp-2m, dpmpp-2m-sde, unipc samplers, not plms\n")


def test_the_validation_grid_is_drawn_with_the_validation_sampler(tmp_path):
    """validation.sampler and validation.karras reach generate: the grid is heun-karras's images."""
    pipe = random_pipeline(TINY, seed=0)
    validation = ValidationSection(sampler="heun", karras=True, steps=3, guidance=5.0, seed=4)
    cfg = dataclasses.replace(TrainConfig(), validation=validation)
    prompts = ["a photo of sks dog", "a dog"]
    train.save_validation_grid(cfg, pipe, tmp_path, 7, contextlib.nullcontext, prompts, [(32, 32)])
    expected = generate(pipe, prompts, seeds=[4, 5], steps=3, sampler="heun", karras=True, guidance=5.0, height=32, width=32)
    ddim = generate(pipe, prompts, seeds=[4, 5], steps=3, guidance=5.0, height=32, width=32)
    grid = np.asarray(Image.open(tmp_path / "samples" / "step-00000007.png"))
    assert np.array_equal(grid, np.asarray(image_grid(expected, columns=2)))
    assert not np.array_equal(grid, np.asarray(image_grid(ddim, columns=2)))
