"""Per-step training metrics: one JSON line per optimizer step, and TensorBoard if asked for;
the values stay on the device until they are written."""

import json
import math
import warnings
from pathlib import Path

import torch

from minidream.files import atomic_file
from minidream.training.distributed import mean_across_ranks


class MetricsLog:
    """Appends `metrics.jsonl` in the run folder; mirrors numbers to TensorBoard when enabled
    and installed (a missing tensorboard is a warning, never a reason to stop training)."""

    def __init__(self, run_dir: Path, tensorboard: bool, tracker=None):
        """`tracker`: also given each record and closed with the log (wandb_log.WandbLog)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tracker = tracker
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("run.tensorboard=true but tensorboard is not installed (pip install tensorboard); "
                              "logging to metrics.jsonl only", stacklevel=2)
            else:
                self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, last_step: int) -> None:
        """Drop records of steps after a resumed checkpoint: they are about to be redone."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        """One line of strict JSON: a non-finite number (a NaN loss, the NaN gradient norm of a fused
        backward) is written as null, which every JSON reader accepts; bare NaN is not JSON."""
        line = {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(line, allow_nan=False) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.tracker is not None:
            self.tracker.finish()


class PendingSteps:
    """Each step's losses, gradient norm and skip flag, kept on the device until `read`.

    Reading a value of a GPU tensor makes the host wait until the GPU has finished everything
    queued, so the next step's kernels cannot be queued ahead. Steps only append here; `read`
    transfers the whole window at once, every `run.log_every_n_steps` steps.
    """

    COLUMNS = ("loss", "loss_instance", "loss_prior", "grad_norm", "skipped")

    def __init__(self, subjects: tuple[str, ...] = ()):
        self.subjects = subjects  # with data.subjects: each gets loss/<name>
        self.steps: list[tuple[int, float]] = []  # (step, its learning rate): host values
        self.values: list[torch.Tensor] = []  # one row of COLUMNS (+ subject sums and counts) per step, on the device

    def add(
        self, step: int, lr: float, losses: torch.Tensor, grad_norm: torch.Tensor, skipped: torch.Tensor,
        subject_totals: torch.Tensor | None = None,
    ) -> None:
        """losses: (loss, instance loss, prior loss) of this rank; grad_norm and skipped: 0-d, the same on every rank;
        subject_totals (with subjects): 2 x S, each subject's summed instance-sample losses and its sample count."""
        self.steps.append((step, lr))
        row = [losses.float(), grad_norm.float()[None], skipped.float()[None]]
        self.values.append(torch.cat(row + ([subject_totals.float().flatten()] if self.subjects else [])))

    def read(self) -> list[dict]:
        """One record per pending step (at least one), losses averaged over ranks; empties the window."""
        values = torch.stack(self.values)
        # Sums and counts averaged alike keep their ratio: a subject's loss is its mean over all ranks' samples.
        averaged = mean_across_ranks(torch.cat([values[:, :3], values[:, 5:]], dim=1))
        values[:, :3], values[:, 5:] = averaged[:, :3], averaged[:, 3:]
        records = []
        count = len(self.subjects)
        for (step, lr), row in zip(self.steps, values.tolist()):  # the one device-to-host copy
            record = {"step": step, "lr": lr} | dict(zip(self.COLUMNS, row))
            record["skipped"] = bool(record["skipped"])
            sums, counts = row[5 : 5 + count], row[5 + count :]
            record |= {f"loss/{name}": total / n for name, total, n in zip(self.subjects, sums, counts) if n > 0}
            records.append(record)
        self.steps, self.values = [], []
        return records
