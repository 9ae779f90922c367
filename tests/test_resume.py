"""Issue 8: a run stopped by SIGTERM, or killed with SIGKILL, then resumed with
run.resume=latest continues exactly as if it had never stopped — bit-identical losses in
metrics.jsonl and bit-identical exported weights."""

import os
import re
import signal

import pytest
from safetensors.torch import load_file
from train_runs import (
    RUN_TIMEOUT_S,
    SETUPS,
    STEPS,
    checkpoint_names,
    exported_weights,
    kill_run,
    metrics,
    output,
    run_setup,
    run_with_failing_save,
    same_tensors,
    start_setup,
    train_args,
    wait_until,
    worker_pid,
)

import train


def assert_resumes_as_if_never_stopped(run_dir, data, setup, never_stopped) -> tuple[int, str]:
    """Resume `run_dir` to STEPS steps and compare it with the uninterrupted run; return the
    step it resumed from, and its output."""
    resumed = run_setup(run_dir, data, setup, "run.resume=latest")
    log = output(resumed)
    assert resumed.returncode == 0, log
    resumed_from = int(re.search(r"resumed from \S+step-(\d{8}) at step (\d+)", log).group(2))
    assert 1 <= resumed_from < STEPS
    # Every step once, in order; those after `resumed_from` were computed by the resumed run.
    steps_and_losses = [(r["step"], r["loss"]) for r in metrics(run_dir)]
    assert steps_and_losses == [(r["step"], r["loss"]) for r in metrics(never_stopped)]
    assert same_tensors(exported_weights(run_dir), exported_weights(never_stopped))
    if (never_stopped / "lora.safetensors").exists():
        assert same_tensors(load_file(run_dir / "lora.safetensors"), load_file(never_stopped / "lora.safetensors"))
    return resumed_from, log


@pytest.mark.parametrize("setup", ["single", "text-encoder", "torchrun", "recipe", "torchrun-recipe", "fused", "lora", "torchrun-lora",
                                   "sdxl-lora", "prodigy", "lion", "adafactor", "schedulefree-validated"])
def test_sigterm_then_resume(setup, tmp_path, training_data, uninterrupted):
    """SIGTERM finishes the step, checkpoints, says how to resume and exits 143 (128 + SIGTERM: not
    finished). Under torchrun only rank 1 gets the signal: every rank must agree to stop at the same
    step, and torchrun reports the workers' non-zero exit as its own."""
    run_dir = tmp_path / "run"
    # max_steps far beyond STEPS leaves the signal room to land mid-run (max_steps may change on resume).
    process = start_setup(run_dir, training_data, setup, "train.max_steps=1000")
    wait_until(lambda: (run_dir / "metrics.jsonl").is_file(), process, "its first step")
    os.kill(worker_pid(process, rank=1) if SETUPS[setup].nproc > 1 else process.pid, signal.SIGTERM)
    log = process.communicate(timeout=RUN_TIMEOUT_S)[0].replace("\r", "\n")
    assert process.returncode == (128 + signal.SIGTERM if SETUPS[setup].nproc == 1 else 1), log
    stopped_at = metrics(run_dir)[-1]["step"]
    assert "SIGTERM: finishing the steps up to the next metrics read, then saving a checkpoint" in log
    launcher = "python train.py" if SETUPS[setup].nproc == 1 else "torchrun <same options> train.py"
    assert f"stopped at step {stopped_at}; to continue: {launcher} --config " in log
    continue_line = next(line for line in log.splitlines() if "; to continue: " in line)
    assert continue_line.rstrip().endswith(" train.max_steps=1000 run.resume=latest")
    assert checkpoint_names(run_dir) == [f"step-{stopped_at:08d}"]
    assert not (run_dir / "model.safetensors").exists()
    assert assert_resumes_as_if_never_stopped(run_dir, training_data, setup, uninterrupted(setup))[0] == stopped_at


@pytest.mark.parametrize("setup", ["single", "text-encoder", "torchrun"])
def test_sigkill_after_a_checkpoint_then_resume(setup, tmp_path, training_data, uninterrupted):
    run_dir = tmp_path / "run"
    process = start_setup(run_dir, training_data, setup, "train.max_steps=1000", "checkpoint.every_n_steps=2")
    wait_until(lambda: (run_dir / "checkpoints" / "step-00000002").is_dir(), process, "its first checkpoint")
    kill_run(process)
    assert_resumes_as_if_never_stopped(run_dir, training_data, setup, uninterrupted(setup))


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, training_data, uninterrupted):
    run_dir = tmp_path / "run"
    killed = run_with_failing_save(run_dir, training_data, "kill", 4, "checkpoint.every_n_steps=2")
    assert killed.returncode == -signal.SIGKILL, output(killed)
    assert checkpoint_names(run_dir) == ["step-00000002", "step-00000004.tmp"]

    resumed_from, log = assert_resumes_as_if_never_stopped(run_dir, training_data, "single", uninterrupted("single"))
    assert resumed_from == 2 and "step-00000004.tmp" in log
    assert log.count("warning: ignoring incomplete checkpoint") == 1 and "UserWarning" not in log  # once, in one line
    # The next save cleared the partial folder away; keep_last=2 keeps the resumed-from one.
    assert checkpoint_names(run_dir) == ["step-00000002", "step-00000008"]


def test_a_stop_asked_for_during_the_last_step_still_exports(tmp_path, training_data, monkeypatch, capsys, one_thread):
    """The last step finishes the run: nothing is left to resume, so the model is exported."""
    loss = train.recipe_loss

    def loss_then_sigterm(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args)

    monkeypatch.setattr(train, "recipe_loss", loss_then_sigterm)
    run_dir = tmp_path / "run"
    assert train.main(train_args(run_dir, training_data, ("train.max_steps=1",))) == 0
    assert "done: 1 steps" in capsys.readouterr().out
    assert (run_dir / "model.safetensors").is_file()
