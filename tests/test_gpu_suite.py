"""The GPU suite's CPU rehearsal runs every stage and writes its JSON and markdown, so the one
prepared GPU run cannot rot between the sessions that get a GPU. No timing is checked."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sample
import train
from bench.common import TABLE_HEADER, Row, Settings, peak_bf16_tflops
from bench.gpu_suite import Budget, cli_accepts
from bench.suite_results import RECIPE_HEADER, StageRecord, SuiteRecord, markdown

REPO_ROOT = Path(__file__).resolve().parents[1]
# The documented rehearsal is --budget 60 (about 35 s of work on an idle 2-core machine). The test
# gives it a budget no machine exhausts, so what it checks never depends on how loaded the machine
# is: every stage runs, however slowly. (What a run does when its budget runs out is
# test_a_spent_budget_skips_every_measurement_and_says_why.)
UNLIMITED = ["--device", "cpu", "--config", "tiny", "--budget", "1e9"]


def run_suite(out: Path, options: list[str]) -> tuple[str, dict, str]:
    command = [sys.executable, "-m", "bench.gpu_suite", *options, "--out", str(out), "--scratch", str(out)]
    # One thread: on a loaded 2-core machine more would oversubscribe it and slow every step tenfold.
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout, json.loads((out / "gpu_suite.json").read_text()), (out / "gpu_suite.md").read_text()


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    return run_suite(tmp_path_factory.mktemp("bench-results"), UNLIMITED)


def test_a_spent_budget_skips_every_measurement_and_says_why(tmp_path):
    """A budget smaller than any estimate: nothing is measured, every stage says it was skipped and
    why, and the record is still written and finished."""
    printed, suite, written = run_suite(tmp_path, ["--device", "cpu", "--config", "tiny", "--budget", "0.001"])
    assert suite["finished"] and [stage["number"] for stage in suite["stages"]] == [1, 2, 3, 4]
    for stage in suite["stages"]:
        assert stage["status"] == "skipped" and not stage["timings"] and not stage["recipes"], stage
        skips = [note for note in stage["notes"] if ": skipped (" in note]
        assert skips and all("budget left" in note for note in skips), stage["notes"]


def accounted_for(stage: dict, labels: list[str], measured: list[str]) -> None:
    """Every planned measurement was either measured or skipped with its reason."""
    skipped = {note.split(": skipped (")[0] for note in stage["notes"] if ": skipped (" in note}
    assert set(labels) == set(measured) | skipped, (labels, measured, skipped)
    assert not set(measured) & skipped


def test_every_stage_runs_and_has_figures(rehearsal):
    printed, suite, _ = rehearsal
    assert suite["finished"] and suite["gpu"] is None and suite["versions"]["diffusers"]
    assert [stage["number"] for stage in suite["stages"]] == [1, 2, 3, 4]
    for stage in suite["stages"]:
        assert stage["status"] in ("done", "partial"), stage
        assert stage["timings"] or stage["recipes"], stage
        for timing in stage["timings"]:
            assert timing["minidream_s"] > 0 and timing["diffusers_s"] > 0
            assert timing["mfu_minidream_pct"] is None  # a CPU
            # The UNet's model FLOPs are counted at any shape, the VAE's known at SD 1.5's only.
            assert (timing["tflop_per_call"] is None) == (timing["benchmark"] == "VAE decode")
        assert f"== {stage['number']}. {stage['title']}" in printed  # each stage reports as it goes
    training, sampling, recipes, vae = suite["stages"]

    labels = ["eager, batch 1", "eager, batch 8", "compiled, batch 8", "compiled, batch 1"]
    measured = [f"{'compiled' if t['compiled'] else 'eager'}, batch {t['items']}" for t in training["timings"]]
    accounted_for(training, labels, measured)
    assert measured[:2] == labels[:2]  # the eager step always fits in the rehearsal's budget
    assert training["memory"] == []  # per-implementation peaks are CUDA's; both share one process here

    accounted_for(sampling, ["eager", "compiled"], ["compiled" if t["compiled"] else "eager" for t in sampling["timings"]])
    differences = [float(d) for note in sampling["notes"] for d in re.findall(r"max \|minidream - diffusers\| = (\S+)", note)]
    assert len(differences) == len(sampling["timings"]) and max(differences) < 1e-4  # same weights, same seeds
    assert any(note.startswith("CUDA graphs:") for note in sampling["notes"])

    full = recipes["recipes"][0]
    assert full["recipe"] == "full" and full["steps"] == 3  # one metrics record per step of train.py's own run
    assert full["peak_rss_mb"] > 100 and full["peak_allocated_mb"] is None
    assert [r["recipe"] for r in recipes["recipes"]] == ["full", "lora"]

    assert [t["benchmark"] for t in vae["timings"]] == ["VAE decode"]
    # Each measurement's seconds are kept, to correct the suite's fixed estimates from.
    figures = sum(len(stage["timings"]) + len(stage["recipes"]) for stage in suite["stages"])
    assert len(suite["measurements"]) == figures and all(m["seconds"] > 0 for m in suite["measurements"])


def test_markdown_is_ready_to_paste(rehearsal):
    _, suite, written = rehearsal
    assert written.startswith("## GPU suite: ")
    assert f"- Command: `python -m bench.gpu_suite {' '.join(UNLIMITED)} " in written
    assert "torch " in written and "diffusers 0.42.1" in written
    timing_rows = sum(len(stage["timings"]) for stage in suite["stages"])
    assert written.count(TABLE_HEADER) == 3  # training, sampling, VAE
    assert len(re.findall(r"^\| UNet train step \|", written, re.M)) == len(suite["stages"][0]["timings"])
    assert len(re.findall(r"^\| (UNet train step|DDIM loop|VAE decode)", written, re.M)) == timing_rows
    assert RECIPE_HEADER in written and "| full |" in written
    assert "no verdict off a GPU" in written


def test_sdxl_runs_every_stage_with_its_own_recipes(tmp_path):
    _, suite, written = run_suite(tmp_path, ["--device", "cpu", "--config", "tiny-sdxl", "--budget", "1e9"])
    assert [stage["number"] for stage in suite["stages"]] == [1, 2, 3, 4]
    training, sampling, recipes, vae = suite["stages"]
    assert [stage["status"] for stage in suite["stages"]] == ["done", "done", "done", "done"]
    assert [(r["recipe"], r["steps"]) for r in recipes["recipes"]] == [("full", 3), ("lora", 3)]  # configs/dreambooth-*sdxl.yaml
    assert all(timing["tflop_per_call"] > 0 for timing in training["timings"] + sampling["timings"])  # MFU on a GPU
    differences = [float(d) for note in sampling["notes"] for d in re.findall(r"max \|minidream - diffusers\| = (\S+)", note)]
    assert len(differences) == 2 and max(differences) < 1e-4  # StableDiffusionXLPipeline, same weights and seeds
    assert "UNet train step, batch 8, latent 8x8: " in written  # the FLOPs behind the MFU


def test_budget_sets_aside_the_later_stages_and_learns_from_measurements():
    budget = Budget(100.0, {"compile": 60.0, "cheap": 30.0})
    assert budget.refusal("compile", ["cheap"]) is None
    refusal = budget.refusal("compile", ["cheap", "cheap"])
    assert refusal is not None and "set aside for the later stages" in refusal
    budget.record("compile", 90.0)  # the same kind is now expected to take what it took
    assert budget.refusal("compile", []) is None and budget.refusal("compile", ["cheap"]) is not None


def test_peak_tflops_by_gpu_name():
    assert peak_bf16_tflops("NVIDIA H200") == peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") is None and peak_bf16_tflops("NVIDIA L4") is None


def test_targets_are_judged_on_a_gpu_record():
    settings = Settings(torch.device("cuda"), "bf16", "sd15", True, False, 2, 5, 989.0, 0)
    # batch 8 at 2.41 TFLOP per sample: 0.04 s is 48.7% MFU; diffusers 0.06 s: 1.5x
    fast = Row("UNet train step", "batch 8, latent 64x64", 8, "samples/s", 8 * 2.41, 0.04, 0.06)
    slow_sampling = Row("DDIM loop, guidance 7.5", "batch 1, latent 64x64, 25 steps", 25, "steps/s", 40.0, 0.5, 0.6)
    stage = StageRecord(1, "t", timings=[(fast, settings), (slow_sampling, settings)])
    record = SuiteRecord("cmd", "NVIDIA H200", "NVIDIA H200", {"torch": "2.11"}, 989.0, 480.0, "medians", stages=[stage])
    text = markdown(record)
    assert "compiled: 1.50x, MFU 48.7% (**met**)" in text
    assert "compiled: 50.0 steps/s (**not met**)" in text


def test_cli_probes_tell_known_options_from_unknown():
    """How the suite finds out whether sample.py has CUDA graphs (and whether a command takes an option)."""
    recipe = ["--config", str(REPO_ROOT / "configs" / "dreambooth-sd15.yaml"), "--show-config"]
    assert cli_accepts(train.main, [*recipe, "train.max_steps=3"])
    assert not cli_accepts(train.main, [*recipe, "train.no_such_key=3"])
    assert cli_accepts(sample.parse_args, ["--weights", "-", "--prompt", "-", "--compile"])
    assert not cli_accepts(sample.parse_args, ["--weights", "-", "--prompt", "-", "--no-such-flag"])
