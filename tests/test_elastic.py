"""Issue 19: under torchrun --max-restarts=1 a worker killed with SIGKILL — between checkpoints, or
while the ranks write one — costs only the steps since the last complete checkpoint: torchrun
starts the worker group again, it resumes by itself (no run.resume given) and ends bit for bit
where the uninterrupted run ends."""

import os
import re
import signal
import subprocess
import time

from train_runs import (
    RUN_TIMEOUT_S,
    exported_weights,
    kill_run,
    losses,
    same_tensors,
    start_setup,
    wait_until,
    worker_pid,
)

from minidream.training.checkpointer import restart_resume


def logged(run_dir, step: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and re.search(rf'"step": {step}\b', path.read_text()) is not None


def finish_after_the_kill(process, run_dir, never_stopped, resumed_from: int) -> None:
    log = process.communicate(timeout=RUN_TIMEOUT_S)[0].replace("\r", "\n")
    assert process.returncode == 0, log
    assert re.search(rf"resumed from \S+step-{resumed_from:08d} at step {resumed_from}", log), log
    assert losses(run_dir) == losses(never_stopped)  # steps after the checkpoint were computed again, the same
    assert same_tensors(exported_weights(run_dir), exported_weights(never_stopped))


def test_a_worker_killed_between_checkpoints_is_restarted_and_resumes(tmp_path, training_data, uninterrupted):
    run_dir = tmp_path / "run"
    process = start_setup(run_dir, training_data, "elastic-fsdp", "checkpoint.every_n_steps=4")
    wait_until(lambda: logged(run_dir, 6), process, "step 6")  # checkpointed at 4, not at 6
    os.kill(worker_pid(process, rank=1), signal.SIGKILL)
    finish_after_the_kill(process, run_dir, uninterrupted("fsdp-text-encoder-ema"), resumed_from=4)


def test_a_worker_killed_while_writing_a_checkpoint_is_restarted_from_the_previous_one(tmp_path, training_data, uninterrupted):
    run_dir = tmp_path / "run"
    process = start_setup(run_dir, training_data, "elastic-fsdp", "checkpoint.every_n_steps=2")
    writing = run_dir / "checkpoints" / "step-00000004.tmp" / "dcp"
    wait_until(writing.is_dir, process, "the ranks writing the step-4 checkpoint")
    os.kill(worker_pid(process, rank=1), signal.SIGKILL)
    assert not (run_dir / "checkpoints" / "step-00000004").exists()  # the kill landed before the write completed
    finish_after_the_kill(process, run_dir, uninterrupted("fsdp-text-encoder-ema"), resumed_from=2)


def test_a_rank_that_stops_answering_ends_the_job_within_the_timeout_naming_it(tmp_path, training_data):
    """SIGSTOP freezes rank 1 (as a hung machine would): rank 0's next collective gives up after
    train.collective_timeout_s and says which rank went silent, and the job ends instead of
    hanging (torchrun then stops the frozen worker: SIGTERM, SIGKILL 30 s later)."""
    run_dir = tmp_path / "run"
    timeout_s = 6
    process = start_setup(run_dir, training_data, "fsdp-text-encoder-ema", "train.max_steps=1000",
                          f"train.collective_timeout_s={timeout_s}")
    wait_until(lambda: logged(run_dir, 2), process, "its first metrics")
    frozen = worker_pid(process, rank=1)
    os.kill(frozen, signal.SIGSTOP)
    started = time.monotonic()
    try:
        log = process.communicate(timeout=timeout_s + 90)[0].replace("\r", "\n")
    except subprocess.TimeoutExpired:
        kill_run(process)
        raise AssertionError("the job still hangs after the collective timeout") from None
    assert process.returncode != 0
    assert f"error (rank 0): a collective waited more than train.collective_timeout_s={timeout_s} s: rank 1 (last heard" in log, log
    assert "stopped answering" in log and time.monotonic() - started < timeout_s + 60


def test_only_a_restarted_worker_group_resumes_by_itself(monkeypatch):
    """A first launch keeps run.resume (resume=none still refuses a run directory holding
    checkpoints: a finished or foreign run is not continued by accident); a group torchrun
    restarted resumes its own checkpoints."""
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    assert restart_resume("none", True) == "none"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert restart_resume("none", True) == "none"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    path = "runs/x/checkpoints/step-00000002"  # a run started from another run's checkpoint
    # The run has written checkpoints: the newest of them, never back to where it started.
    assert [restart_resume(r, True) for r in ("none", "latest", "auto", path)] == ["auto"] * 4
    # It has not yet: start as the first launch did (latest would fail on the empty run).
    assert [restart_resume(r, False) for r in ("none", "latest", "auto", path)] == ["auto", "auto", "auto", path]
