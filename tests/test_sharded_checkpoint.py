"""Issue 19: FSDP checkpoints (torch.distributed.checkpoint) resume on another world size, and
under DDP; DDP checkpoints resume under FSDP. With the same global batch, the continued run
stays on the uninterrupted one's loss curve and ends at its weights (fp32 tolerance: the ranks
sum in another order). That the data order follows the global cursor on any world size is
tests/test_order.py's."""

import re
import shutil

import pytest
from test_fsdp import LOG_TOLERANCE, WEIGHT_TOLERANCE
from train_runs import (
    STEPS,
    exported_weights,
    losses,
    max_difference,
    output,
    run_setup,
)

HALF = STEPS // 2
# A one-process run of the 2-rank setups' global batch, writing DCP checkpoints.
ONE_PROCESS_FSDP = ("text-encoder-ema", "train.sharding=fsdp")


def resume_and_compare(run_dir, data, setup, extra, never_stopped):
    resumed = run_setup(run_dir, data, setup, *extra, "run.resume=latest")
    log = output(resumed)
    assert resumed.returncode == 0, log
    assert re.search(rf"resumed from \S+step-{HALF:08d} at step {HALF}", log)
    mine, theirs = losses(run_dir), losses(never_stopped)
    assert sorted(mine) == sorted(theirs) == list(range(1, STEPS + 1))
    assert all(abs(mine[s] - theirs[s]) <= LOG_TOLERANCE * abs(theirs[s]) for s in theirs)
    reference = exported_weights(never_stopped)
    tolerance = WEIGHT_TOLERANCE * max(v.abs().max().item() for v in reference.values())
    assert max_difference(exported_weights(run_dir), reference) <= tolerance


@pytest.fixture(scope="module")
def half_runs(tmp_path_factory, training_data):
    """`half_runs(setup, *extra)`: a fresh copy of a run directory stopped (finished) after HALF steps
    (or as `extra` says)."""
    made = {}

    def copy(*setup):
        if setup not in made:
            made[setup] = tmp_path_factory.mktemp("half")
            result = run_setup(made[setup], training_data, setup[0], f"train.max_steps={HALF}", *setup[1:])
            assert result.returncode == 0, output(result)
        target = tmp_path_factory.mktemp("resumed") / "run"
        shutil.copytree(made[setup], target)
        return target

    return copy


@pytest.mark.parametrize("saved_by, resumed_by, reference", [
    (("fsdp-text-encoder-ema",), ONE_PROCESS_FSDP, "text-encoder-ema"),
    (ONE_PROCESS_FSDP, ("fsdp-text-encoder-ema",), "fsdp-text-encoder-ema"),
    (("torchrun-text-encoder-ema",), ("fsdp-text-encoder-ema",), "fsdp-text-encoder-ema"),
    (("fsdp-text-encoder-ema",), ("torchrun-text-encoder-ema",), "torchrun-text-encoder-ema"),
], ids=["fsdp 2 ranks -> 1 process", "1 process -> fsdp 2 ranks", "ddp checkpoint -> fsdp", "fsdp checkpoint -> ddp"])
def test_a_checkpoint_resumes_on_another_world_size_and_sharding(saved_by, resumed_by, reference, half_runs,
                                                                training_data, uninterrupted):
    """(On the same world size a resume is bit for bit: tests/test_elastic.py's restarted runs show it.)"""
    run_dir = half_runs(*saved_by)
    resume_and_compare(run_dir, training_data, resumed_by[0], resumed_by[1:], uninterrupted(reference))


def test_a_position_the_ranks_cannot_split_is_refused(half_runs, training_data):
    """One step of a global batch of 3 stops 3 items into the epoch: 2 ranks cannot continue it."""
    run_dir = half_runs("text-encoder-ema-batch-3", "train.max_steps=1")
    result = run_setup(run_dir, training_data, "fsdp-text-encoder-ema", "run.resume=latest")
    assert result.returncode != 0  # torchrun reports its workers' exit status 2 as a failure
    assert "stopped 3 items into epoch 0, which 2 ranks cannot split evenly; resume on a number of ranks that divides it" in output(result)
