"""Running train.py as users do — a subprocess, alone or under torchrun — on small prepared
data, and reading back what it wrote."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from photo_sets import BUCKET_OPTIONS, subjects_override, write_two_subjects
from safetensors.torch import load_file

from minidream.training.example_subject import (
    draw_example_subject,
    write_example_subject,
)

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
TINY_CONFIG = TRAIN.parent / "configs" / "tiny.yaml"
STEPS = 8  # optimizer steps of an uninterrupted run ("2N")
RUN_TIMEOUT_S = 300  # a hung run (a collective waiting for a dead rank) fails the test instead of CI


@dataclass(frozen=True)
class Setup:
    """How a run is launched: processes, and the overrides that make its global batch."""

    nproc: int
    overrides: tuple[str, ...]
    restarts: int = 0  # torchrun --max-restarts: a failed worker group is started again


# tiny.yaml's data: 4 instance and 8 class images, so an epoch is 8 items and divides by 2 ranks.
# LoRA on the UNet and the text encoder, with EMA of the adapters; lr raised so adapters move in 8 steps.
LORA = ("lora.rank=4", "lora.text_encoder_rank=2", "lora.targets=all", "train.lr=1e-3", "train.ema_decay=0.9")
RECIPE = ("train.ema_decay=0.9", "train.snr_gamma=5", "train.noise_offset=0.05", "train.input_perturbation=0.05", "train.loss=huber")
# Real photo sets (photo_sets.write_two_subjects): buckets, two subjects, captions dropped and
# templated, masks, random crops and flips. <data> is the run's data folder.
SUBJECTS = (
    *BUCKET_OPTIONS, subjects_override("<data>"), "data.caption_template=a photo of {identifier} {class}",
    "data.caption_dropout=0.5", "data.masks=true", "data.random_flip=true", "data.center_crop=false",
)
PRODIGY = ("train.optimizer=prodigy", "train.lr=1.0")  # Prodigy's own lr: d, not lr, sets the step size
SCHEDULE_FREE_VALIDATED = ("train.optimizer=adamw-schedulefree", "train.lr=1e-3", "validation.prompts=[a photo of sks toy]",
                           "validation.every_n_steps=1", "validation.steps=2")
TEXT_ENCODER_EMA = ("train.train_text_encoder=true", "train.ema_decay=0.9")
SDXL = ("model.architecture=tiny-sdxl",)
SETUPS = {
    "single": Setup(1, ("train.batch_size=2",)),
    "text-encoder": Setup(1, ("train.batch_size=2", "train.train_text_encoder=true")),
    "torchrun": Setup(2, ("train.batch_size=1",)),
    "single-accumulate": Setup(1, ("train.batch_size=2", "train.gradient_accumulation_steps=2")),
    "torchrun-accumulate": Setup(2, ("train.batch_size=1", "train.gradient_accumulation_steps=2")),
    "recipe": Setup(1, ("train.batch_size=2", *RECIPE)),
    "torchrun-recipe": Setup(2, ("train.batch_size=1", *RECIPE)),
    "fused": Setup(1, ("train.batch_size=2", "train.fused_backward=true", "train.max_grad_norm=null", "train.ema_decay=0.9")),
    "lora": Setup(1, ("train.batch_size=2", *LORA)),
    "torchrun-lora": Setup(2, ("train.batch_size=1", *LORA)),
    "subjects": Setup(1, ("train.batch_size=2", *SUBJECTS)),
    "torchrun-subjects": Setup(2, ("train.batch_size=1", *SUBJECTS)),
    # Issue 19: FSDP against DDP and one process, the text encoder trained, with EMA (tests/test_fsdp.py).
    "text-encoder-ema": Setup(1, ("train.batch_size=2", *TEXT_ENCODER_EMA)),
    "torchrun-text-encoder-ema": Setup(2, ("train.batch_size=1", *TEXT_ENCODER_EMA)),
    "fsdp-text-encoder-ema": Setup(2, ("train.batch_size=1", *TEXT_ENCODER_EMA, "train.sharding=fsdp")),
    "text-encoder-ema-batch-3": Setup(1, ("train.batch_size=3", *TEXT_ENCODER_EMA)),
    "torchrun-3-text-encoder-ema": Setup(3, ("train.batch_size=1", *TEXT_ENCODER_EMA)),
    "fsdp-3-text-encoder-ema": Setup(3, ("train.batch_size=1", *TEXT_ENCODER_EMA, "train.sharding=fsdp")),
    "fsdp-lora": Setup(2, ("train.batch_size=1", *LORA, "train.sharding=fsdp")),
    "fsdp-subjects": Setup(2, ("train.batch_size=1", *SUBJECTS, "train.sharding=fsdp")),  # issues 16 + 19 together
    "fsdp-accumulate": Setup(2, ("train.batch_size=1", "train.gradient_accumulation_steps=2", "train.gradient_checkpointing=true",
                                 "train.sharding=fsdp")),
    # SDXL (tests/test_sdxl_train.py): LoRA on the UNet and both text encoders with EMA, on the real
    # photo sets (buckets, random crops and flips: every sample's size ids differ); the full model.
    "sdxl-lora": Setup(1, (*SDXL, "train.batch_size=2", *LORA, "lora.alpha=8", *SUBJECTS)),
    "torchrun-sdxl-lora": Setup(2, (*SDXL, "train.batch_size=1", *LORA, "lora.alpha=8", *SUBJECTS)),
    "sdxl-text-encoder-ema": Setup(1, (*SDXL, "train.batch_size=2", *TEXT_ENCODER_EMA)),
    "torchrun-sdxl-text-encoder-ema": Setup(2, (*SDXL, "train.batch_size=1", *TEXT_ENCODER_EMA)),
    "fsdp-sdxl-text-encoder-ema": Setup(2, (*SDXL, "train.batch_size=1", *TEXT_ENCODER_EMA, "train.sharding=fsdp")),
    # Issue 31: the optimizers beyond AdamW (tests/test_resume.py, tests/test_optimizer_choices.py); schedule-free
    # with a validation grid (its evaluation weights swapped in and out) after every step.
    "prodigy": Setup(1, ("train.batch_size=2", *PRODIGY)),
    "torchrun-prodigy": Setup(2, ("train.batch_size=1", *PRODIGY)),
    "lion": Setup(1, ("train.batch_size=2", "train.optimizer=lion")),
    "torchrun-lion": Setup(2, ("train.batch_size=1", "train.optimizer=lion")),
    "adafactor": Setup(1, ("train.batch_size=2", "train.optimizer=adafactor", "train.lr=1e-3")),
    "torchrun-adafactor": Setup(2, ("train.batch_size=1", "train.optimizer=adafactor", "train.lr=1e-3")),
    "schedulefree-validated": Setup(1, ("train.batch_size=2", *SCHEDULE_FREE_VALIDATED)),
    "torchrun-schedulefree-validated": Setup(2, ("train.batch_size=1", *SCHEDULE_FREE_VALIDATED)),
    # Elastic (tests/test_elastic.py): the fsdp run above under torchrun --max-restarts=1.
    "elastic-fsdp": Setup(2, ("train.batch_size=1", *TEXT_ENCODER_EMA, "train.sharding=fsdp"), restarts=1),
}


def write_training_data(folder: Path) -> Path:
    """4 drawn subject images and 8 class images (other drawings: no class generation needed), and
    the two-subject photo set of the "subjects" setups."""
    write_example_subject(folder / "subject", count=4, size=64)
    (folder / "class").mkdir()
    for index in range(8):
        draw_example_subject(100 + index, 64).save(folder / "class" / f"class-{index:05d}.png")
    return write_two_subjects(folder)


def train_args(run_dir: Path, data: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    """train.py's arguments for a STEPS-step tiny run on `data`, without validation grids, reading
    metrics back every 2 steps (so runs also cover steps whose metrics wait on the device).
    `<data>` in an override is replaced by `data`."""
    return [
        "--config", str(TINY_CONFIG), f"run.output_dir={run_dir}",
        f"data.instance_dir={data / 'subject'}", "data.example_subject=false", f"data.class_dir={data / 'class'}",
        f"train.max_steps={STEPS}", "validation.prompts=[]", "run.log_every_n_steps=2",
        *(override.replace("<data>", str(data)) for override in overrides),
    ]


def train_command(run_dir: Path, data: Path, overrides: tuple[str, ...], nproc: int, restarts: int = 0) -> list[str]:
    args = [str(TRAIN), *train_args(run_dir, data, overrides)]
    if nproc == 1:
        return [sys.executable, *args]
    # --standalone: a local rendezvous on a free port.
    elastic = [f"--max-restarts={restarts}"] if restarts else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *elastic, *args]


# One thread per process. The last bits of a result depend on the thread count, so runs compared
# bit for bit must agree on it; and busy-waiting threads on oversubscribed cores (two ranks, or
# a shared CI machine) can make a run many times slower.
ENVIRONMENT = os.environ | {"OMP_NUM_THREADS": "1"}


def run_setup(run_dir: Path, data: Path, setup: str, *extra: str) -> subprocess.CompletedProcess:
    chosen = SETUPS[setup]
    return subprocess.run(
        train_command(run_dir, data, chosen.overrides + extra, chosen.nproc, chosen.restarts), capture_output=True, text=True,
        env=ENVIRONMENT, timeout=RUN_TIMEOUT_S,
    )


def start_setup(run_dir: Path, data: Path, setup: str, *extra: str) -> subprocess.Popen:
    chosen = SETUPS[setup]
    return subprocess.Popen(
        train_command(run_dir, data, chosen.overrides + extra, chosen.nproc, chosen.restarts), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=ENVIRONMENT,
    )


def wait_until(condition, process: subprocess.Popen, what: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
    """Poll `condition()` until true; fail with the run's output if it ends or times out first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the run ended or stalled before {what}:\n{process.communicate()[0]}")
        time.sleep(0.02)


def children(process: subprocess.Popen) -> list[int]:
    """The process ids a run started: torchrun's workers (Linux: read from /proc)."""
    return [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The process id of torchrun's worker of `rank`."""
    for pid in children(launcher):
        if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return pid
    raise AssertionError(f"torchrun has no worker of rank {rank}")


def kill_run(process: subprocess.Popen) -> None:
    """SIGKILL the run and its workers at once, as a crashed node would (torchrun puts each
    worker in a session of its own, so a process-group kill would miss them)."""
    for pid in [*children(process), process.pid]:
        os.kill(pid, signal.SIGKILL)
    process.wait()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in metrics(run_dir)}


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(path.name for path in (run_dir / "checkpoints").iterdir())


def exported_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model.safetensors")


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit for bit. (Not the files' bytes: safetensors writes metadata keys in a random order.)"""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def output(result: subprocess.CompletedProcess) -> str:
    """A run's stdout and stderr, tqdm's carriage-return redraws split into lines."""
    return (result.stdout + result.stderr).replace("\r", "\n")


# train.py with the checkpoint writer patched: checkpoint FAIL_AT gets half its weights file
# written, then the process is SIGKILLed ("kill") or the disk is full ("disk-full").
FAILING_SAVE = """
import errno, os, signal, sys
from minidream.training import checkpoint
import train

HOW, FAIL_AT = sys.argv[1], f"step-{int(sys.argv[2]):08d}.tmp"
write = checkpoint.save_file

def write_half_then_fail(tensors, path):
    write(tensors, path)
    if FAIL_AT in str(path):
        os.truncate(path, os.path.getsize(path) // 2)
        if HOW == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, "No space left on device")

checkpoint.save_file = write_half_then_fail
sys.exit(train.main(sys.argv[3:]))
"""


def run_with_failing_save(run_dir: Path, data: Path, how: str, fail_at: int, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", FAILING_SAVE, how, str(fail_at), *train_args(run_dir, data, SETUPS["single"].overrides + overrides)],
        capture_output=True, text=True, env=ENVIRONMENT, cwd=TRAIN.parent, timeout=RUN_TIMEOUT_S,
    )
