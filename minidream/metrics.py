"""Per-step training metrics: one JSON line per optimizer step, and TensorBoard if asked for."""

import json
import warnings
from pathlib import Path

from minidream.files import atomic_file


class MetricsLog:
    """Appends `metrics.jsonl` in the run folder; mirrors numbers to TensorBoard when enabled
    and installed (a missing tensorboard is a warning, never a reason to stop training)."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
