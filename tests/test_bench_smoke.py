"""The bench scripts run end to end at their tiniest settings and print their tables. No
timing is checked here: speed is shown by BENCHMARKS.md, not by tests."""

import math
import os
import re
import subprocess
import sys

import pytest

from bench import (
    fsdp_memory,
    memory,
    sampling_loop,
    saved_tensors,
    train_features,
    unet_train_step,
    vae,
)
from bench.common import SD15_TFLOP
from bench.models import counted_unet_tflop
from minidream.config import SD15, TINY_SDXL
from minidream.models.unet import UNet

TIMING = ["--device", "cpu", "--warmup", "0", "--repeats", "1"]
TINIEST = [*TIMING, "--config", "tiny"]


def assert_timed(rows, count: int, has_flops: bool) -> None:
    """has_flops: the UNet's rows carry model FLOPs at any shape (counted), the VAE's at SD 1.5's only."""
    assert len(rows) == count
    for row in rows:
        assert row.minidream_s > 0 and row.diffusers_s > 0
        assert math.isfinite(row.ratio)
        assert (row.tflop_per_call > 0) if has_flops else (row.tflop_per_call is None)


def assert_table(printed: str, module: str, data_rows: int) -> None:
    assert f"Command: `python -m bench.{module} " in printed
    assert "Machine: " in printed and "torch " in printed and "diffusers " in printed
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert "minidream/diffusers" in table[0]
    assert len(table) == 1 + data_rows


@pytest.mark.parametrize("config", ["tiny", "tiny-sdxl"])
def test_unet_train_step(capsys, config):
    rows = unet_train_step.main([*TIMING, "--config", config, "--latent", "8", "--batches", "1", "2"])
    assert_timed(rows, 2, has_flops=True)
    assert [row.items for row in rows] == [1, 2]
    assert_table(capsys.readouterr().out, "unet_train_step", 2)


@pytest.mark.parametrize("config", ["tiny", "tiny-sdxl"])
def test_unet_sampling_step(capsys, config):
    rows = unet_train_step.main([*TIMING, "--config", config, "--latent", "8", "--batches", "1", "--workload", "sample"])
    assert_timed(rows, 1, has_flops=True)
    assert rows[0].benchmark == "UNet guided sampling step"
    assert_table(capsys.readouterr().out, "unet_train_step", 1)


def test_counted_unet_flops_equal_design_mds_at_sd15():
    """FlopCounterMode's count (every shape but SD 1.5's) against DESIGN.md's SD 1.5 figures at
    512 px: 0.80 TFLOP forward, 2.41 forward and backward, per sample."""
    for backward, figure in ((False, SD15_TFLOP["unet_forward"]), (True, SD15_TFLOP["unet_train"])):
        assert counted_unet_tflop(SD15.unet, 1, 64, 77, backward) == pytest.approx(figure, rel=5e-3)


@pytest.mark.parametrize("config, sampler, calls", [
    ("tiny", ["--sampler", "ddim"], 2), ("tiny-sdxl", [], 2), ("tiny", ["--sampler", "heun", "--karras"], 3),
])
def test_sampling_loop_times_identical_runs(capsys, config, sampler, calls):
    rows = sampling_loop.main([*TIMING, "--config", config, "--latent", "8", "--steps", "2", *sampler])
    assert_timed(rows, 1, has_flops=True)
    printed = capsys.readouterr().out
    assert_table(printed, "sampling_loop", 1)
    assert f"2 steps = {calls} UNet calls" in printed  # Heun: 2N - 1
    difference = float(re.search(r"max \|minidream - diffusers\| = (\S+)", printed).group(1))
    assert difference < 1e-4  # the same weights and seeds give the same latents in both


def test_vae(capsys):
    rows = vae.main([*TINIEST, "--image", "32"])
    assert_timed(rows, 2, has_flops=False)
    assert_table(capsys.readouterr().out, "vae", 2)


def test_memory_measures_each_implementation_in_its_own_process(capsys):
    row = memory.main(["--device", "cpu", "--config", "tiny", "--latent", "8"])
    assert row.minidream_mb > 0 and row.diffusers_mb > 0
    printed = capsys.readouterr().out
    assert "Command: `python -m bench.memory " in printed
    assert "minidream/diffusers" in printed


def test_fsdp_memory_shards_the_sdxl_unet_alone_at_16_bytes_per_parameter_over_n(capsys):
    """SDXL's full fine-tune trains the UNet on cached text states: rank 0 of 4 holds a quarter
    of the UNet's weights, gradients and moments (a little more: it gets the larger part of an
    uneven split), and no text encoder."""
    measured = fsdp_memory.main(["--ranks", "4", "--config", "tiny-sdxl", "--unet-only"])
    assert measured["params"] == sum(p.numel() for p in UNet(TINY_SDXL.unet).parameters())
    assert measured["expected"] <= measured["training_state"] <= 1.01 * measured["expected"]
    assert "tiny-sdxl: UNet trained" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # both text encoders trained: not what this bench measures
        fsdp_memory.main(["--ranks", "4", "--config", "tiny-sdxl"])
    assert "add --unet-only" in capsys.readouterr().err


def test_train_features_times_train_py_with_each_feature_on_and_off(capsys):
    results = train_features.main(
        ["--device", "cpu", "--steps", "4", "--log-every", "2", "--repeats", "1", "--features", "cache-latents", "set-to-none"]
    )
    assert list(results) == ["cache-latents", "set-to-none"]
    assert all(on > 0 and off > 0 for on, off in results.values())
    printed = capsys.readouterr().out
    assert "Command: `python -m bench.train_features " in printed
    assert len([line for line in printed.splitlines() if line.startswith("| ")]) == 1 + 2  # the header, then a row per feature


def test_saved_tensors_splits_weights_copies_and_activations(capsys):
    fp32 = saved_tensors.main(["--device", "cpu", "--config", "tiny", "--latent", "8", "--dtype", "fp32"])
    bf16 = saved_tensors.main(["--device", "cpu", "--config", "tiny", "--latent", "8", "--dtype", "bf16"])
    for impl in ("minidream", "diffusers"):
        assert fp32[impl]["weights"] > 0 and fp32[impl]["weight copies"] == 0 and fp32[impl]["activations"] > 0
        # Under autocast the convs and linears save bf16 copies of their weights, not the weights.
        assert bf16[impl]["weights"] < fp32[impl]["weights"] / 10
        assert 0.4 * fp32[impl]["weights"] < bf16[impl]["weight copies"] <= 0.5 * fp32[impl]["weights"]
    assert fp32["minidream"] == fp32["diffusers"]  # fp32: the very same tensors are saved
    assert "Command: `python -m bench.saved_tensors " in capsys.readouterr().out


def test_collectives_times_each_collective_per_shard_size():
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bench.collectives",
         "--sizes-mb", "0.01", "0.02", "--repeats", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| 0.0")]
    assert len(rows) == 2 and all(line.count(" ms") == 3 for line in rows)
