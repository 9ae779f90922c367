"""Training-state checkpoints: everything needed to resume as if the run had never stopped.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
  <module>.safetensors  the trainable weights (frozen ones are never copied here; with LoRA the adapters only)
  ema.safetensors       the EMA of the trainable weights, when train.ema_decay is set
  optimizer.pt          the optimizer state (tensors and numbers only: read with weights_only=True)
  trainer.pt            step, data position, LR-schedule and GradScaler state, every rank's RNG states,
                        and what was trained (to refuse resuming into a different setup)
  checksums.json        the sha256 of every other file, written last: resume verifies them, so a
                        damaged or truncated file is named and never loaded
It is written under a temporary name and renamed when complete, so a crash mid-write leaves
only a `.tmp` folder that resume ignores, and the previous checkpoint untouched. When to save,
which checkpoint to resume and rotation are checkpointer.py's.
"""

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from minidream.files import atomic_folder, file_sha256
from minidream.models.lora import AdapterMismatch, load_lora_state_dict, lora_state_dict
from minidream.training.ema import EMA
from minidream.training.optimizers import FusedBackward
from minidream.training.order import Cursor

EMA_FILE = "ema.safetensors"  # the averaged weights, named <module>.<parameter>
CHECKSUMS = "checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from, with the path and what to do."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def partial_dir(final: Path) -> Path:
    """Where the checkpoint `final` is written until complete: `step-N.tmp`, the name by which
    partial_dirs recognises an interrupted write."""
    return final.with_name(final.name + ".tmp")


def partial_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoints left incomplete (partial_dir), oldest first."""
    return sorted((Path(run_dir) / "checkpoints").glob("step-*.tmp"))


def capture_rng() -> dict:
    """This process's global random states. (Training noise does not use them — it comes from
    per-sample generators keyed by the data position — but dropout or user code might.)"""
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]),
        "python": random.getstate(),
    }


def restore_rng(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(states["python"])


@dataclass
class TrainerState:
    """Everything a run needs to continue as if it had never stopped, saved and restored whole.

    The modules and optimizer are the live objects (their state is read at save time and loaded
    in place at resume); the counters are plain values train.py advances. EMA and LoRA state
    join here as fields, so train.py never packs a checkpoint by hand.
    """

    modules: dict[str, nn.Module]  # the trainable modules; frozen ones are never saved
    optimizer: torch.optim.Optimizer | FusedBackward
    lr_schedule: torch.optim.lr_scheduler.LRScheduler | None  # None: FusedBackward sets its own LR
    scaler: torch.amp.GradScaler
    setup: dict  # what a resumed run must match: architecture, trained modules, LoRA, EMA, optimizer
    adapters_only: bool = False  # LoRA: only the adapters train, so only they are saved (megabytes)
    ema: EMA | None = None  # the averaged weights, when train.ema_decay is set
    step: int = 0  # optimizer steps done
    cursor: Cursor = field(default_factory=Cursor)  # the run's place in the data (global: the same on every rank)
    nonfinite_run: int = 0  # consecutive non-finite losses so far

    def counters(self, rng: list[dict]) -> dict:
        """trainer.pt: numbers and tensors only (read back with weights_only=True)."""
        return {
            # global_position: the cursor counts all ranks' items (older readers took it as per-rank).
            "step": self.step, "epoch": self.cursor.epoch, "position": self.cursor.position, "global_position": True,
            "nonfinite_run": self.nonfinite_run,
            "lr_schedule": self.lr_schedule.state_dict() if self.lr_schedule is not None else None,
            "scaler": self.scaler.state_dict(), "rng": rng, "setup": self.setup,
            "ema_updates": self.ema.updates.cpu() if self.ema is not None else None,
        }

    def weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of a trained module: all its weights, or its adapters alone."""
        return lora_state_dict(module) if self.adapters_only else module.state_dict()


def save_checkpoint(run_dir: Path, state: TrainerState, rng: list[dict]) -> Path:
    """Write `state` (and every rank's RNG states, `rng`) as the checkpoint of its step,
    atomically; return its folder. Call on the main rank only.

    On any failure (disk full, permissions) the partial folder is removed, earlier
    checkpoints are untouched, and a CheckpointError says what happened.
    """
    final = checkpoint_dir(run_dir, state.step)
    try:
        with atomic_folder(final, replace=True, temporary=partial_dir(final)) as folder:
            for name, module in state.modules.items():
                save_file(_on_host(state.weights(module)), folder / f"{name}.safetensors")
            if state.ema is not None:
                save_file(_on_host(state.ema.state_dict()["shadow"]), folder / EMA_FILE)
            torch.save(state.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(state.counters(rng), folder / "trainer.pt")
            write_checksums(folder)
    except OSError as error:
        raise write_failed(final, error) from None
    return final


def write_checksums(folder: Path) -> None:
    """checksums.json: the sha256 of every file under `folder` (DCP's too), by relative path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    sums = {str(p.relative_to(folder)): file_sha256(p) for p in files}
    (folder / CHECKSUMS).write_text(json.dumps(sums, indent=0, sort_keys=True))


def damage(folder: Path) -> str | None:
    """What is wrong with the checkpoint `folder`, in a few words naming the file, or None when every
    file checksums.json lists is there with its sha256. (A checkpoint written before checksums
    existed has none to check: only its trainer.pt is required.)"""
    listing = folder / CHECKSUMS
    if not listing.is_file():
        return None if (folder / "trainer.pt").is_file() else "trainer.pt is missing"
    try:
        sums = json.loads(listing.read_text())
    except (OSError, ValueError) as error:
        return f"{CHECKSUMS} is unreadable ({error})"
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != expected:
            return f"{name} does not match its checksum (damaged or truncated)"
    return None


def write_failed(final: Path, error: OSError) -> CheckpointError:
    """The one line for a checkpoint write that failed (disk full, permissions)."""
    return CheckpointError(
        f"could not write checkpoint {final} ({error.strerror or error}); the previous checkpoint is intact — "
        "free disk space or fix permissions, then resume with run.resume=latest"
    )


def load_checkpoint(path: Path, state: TrainerState, rank: int, world_size: int = 1) -> None:
    """Restore `state` in place from the checkpoint folder `path`, and this rank's RNG states.

    The checkpoint's setup must equal `state.setup` (architecture, trainable modules); a
    mismatch is refused with both values named, before anything is loaded.
    """
    saved = read_counters(path, state.setup, world_size)
    for name, module in state.modules.items():
        tensors = load_file(path / f"{name}.safetensors", device=str(next(module.parameters()).device))
        if state.adapters_only:
            try:
                load_lora_state_dict(module, tensors)
            except AdapterMismatch as error:
                raise CheckpointError(f"{path / (name + '.safetensors')}: {error}") from None
        else:
            module.load_state_dict(tensors)
    state.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    if state.ema is not None:
        shadow = load_file(path / EMA_FILE, device=str(state.ema.updates.device))
        state.ema.load_state_dict({"shadow": shadow, "updates": saved["ema_updates"]})
    restore_counters(saved, state, rank)


def read_counters(path: Path, setup: dict, world_size: int) -> dict:
    """trainer.pt of the checkpoint `path`, refused (both values named) when its setup is not
    `setup` or its data position cannot be split over `world_size` ranks."""
    saved = torch.load(path / "trainer.pt", weights_only=True)
    for key in sorted(setup.keys() | saved["setup"].keys()):  # a key absent on one side is None there
        if saved["setup"].get(key) != setup.get(key):
            raise CheckpointError(
                f"{path} was written with {key}={saved['setup'].get(key)!r} but this run has {key}={setup.get(key)!r}; "
                "resume with the same setup or start a new run.output_dir"
            )
    if saved["position"] % world_size:
        raise CheckpointError(
            f"{path} stopped {saved['position']} items into epoch {saved['epoch']}, which {world_size} ranks cannot split "
            "evenly; resume on a number of ranks that divides it (the global batch must stay the same)"
        )
    return saved


def restore_counters(saved: dict, state: TrainerState, rank: int) -> None:
    """Everything of trainer.pt into `state`: LR schedule, EMA count, scaler, counters, cursor, RNG."""
    if state.lr_schedule is not None:
        state.lr_schedule.load_state_dict(saved["lr_schedule"])
    state.scaler.load_state_dict(saved["scaler"])
    state.step, state.nonfinite_run = saved["step"], saved["nonfinite_run"]
    state.cursor = Cursor(saved["epoch"], saved["position"])
    # A run resumed on more ranks than it was saved with gives the new ranks rank 0's states.
    rng = saved["rng"]
    restore_rng(rng[rank] if rank < len(rng) else rng[0])


def _on_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().contiguous().cpu() for key, tensor in tensors.items()}
