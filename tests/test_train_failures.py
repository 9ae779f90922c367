"""Issue 8: each way a run can fail says what happened and what to do, and loses nothing:
earlier checkpoints, metrics and the resolved config stay as they were."""

import math
import shutil

import pytest
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
    assert f"error (rank 0): run.output_dir {blocker / 'run'} is not writable (Not a directory)" in capsys.readouterr().err
    assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("folder, message", [("missing", "does not exist"), ("empty", "holds no usable images")])
def test_missing_or_empty_instance_folder_is_reported_before_any_model_loads(
    folder, message, tmp_path, training_data, no_model_loading, capsys
):
    (tmp_path / "empty").mkdir()
    args = train_args(tmp_path / "run", training_data, (f"data.instance_dir={tmp_path / folder}",))
    assert train.main(args) == 2
    assert f"error (rank 0): instance folder {tmp_path / folder} {message}" in capsys.readouterr().err


def test_unknown_config_key_is_an_error_naming_the_nearest(tmp_path, training_data, capsys):
    assert train.main(train_args(tmp_path / "run", training_data, ("train.max_step=3",))) == 2
    assert "unknown key 'max_step'; did you mean 'max_steps'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_failed_save_is_reported_and_the_previous_checkpoint_resumes(tmp_path, training_data, uninterrupted):
    run_dir = tmp_path / "run"
    failed = run_with_failing_save(run_dir, training_data, "disk-full", 4, "checkpoint.every_n_steps=2")
    assert failed.returncode == 2, output(failed)
    assert (
        f"error (rank 0): could not write checkpoint {run_dir / 'checkpoints' / 'step-00000004'} (No space left on device); "
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
        f"error (rank 0): {run_dir / 'checkpoints' / f'step-{STEPS:08d}'} was written with trained=['unet'] "
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
    assert all(r["skipped"] and not math.isfinite(r["loss"]) for r in new)
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
