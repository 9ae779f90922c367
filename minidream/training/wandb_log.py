"""Weights & Biases tracking (run.wandb): the resolved config, every metrics.jsonl record at its
own step, the validation grids as images and the evaluation scores (they are in the records),
from the main rank. The wandb package is imported only when run.wandb is on.

W&B drops a row whose step is below one already logged, so each record goes at its own step
(`log(record, step=record["step"])`, as kohya's and diffusers' trackers do) and a grid goes right
after the record of its step: grids are written after the step's metrics are read, or before,
when the reads are further apart (run.log_every_n_steps), so each grid is logged just before the
first record of a later step, or with the record of its own.

The run id is kept in the run folder (wandb-run-id), so a resumed run continues the same W&B
run (`resume="allow"`); the W&B files go into the run folder's wandb/ (offline runs too:
WANDB_MODE=offline, then `wandb sync`).
"""

import re
import secrets
import warnings
from pathlib import Path

from minidream.config import ConfigError, TrainConfig, to_dict
from minidream.files import atomic_file

RUN_ID_FILE = "wandb-run-id"
GRID_NAME = re.compile(r"step-(\d{8})(?:-(\d+x\d+))?\.png")


class WandbLog:
    def __init__(self, wandb, cfg: TrainConfig, run_dir: Path):
        self.wandb, self.samples = wandb, Path(run_dir) / "samples"
        id_file = Path(run_dir) / RUN_ID_FILE
        if not id_file.exists():
            with atomic_file(id_file) as tmp:
                tmp.write_text(secrets.token_hex(4) + "\n")  # W&B run ids: 8 characters of [a-z0-9], as its own
        try:
            self.run = wandb.init(
                project=cfg.run.wandb_project, name=cfg.run.wandb_name or Path(run_dir).name, id=id_file.read_text().strip(),
                resume="allow", config=to_dict(cfg), dir=str(run_dir),
            )
        except wandb.Error as error:  # e.g. "No API key configured. Use `wandb login` to log in."
            raise ConfigError(f"run.wandb=true: {error} (or set WANDB_MODE=offline)") from None
        self.logged = set(self.grids())  # a resumed run's earlier grids went to W&B before it stopped

    def grids(self) -> dict[str, tuple[int, str]]:
        """The grid files in samples/: name -> (step, W&B key)."""
        found = {}
        for path in self.samples.glob("step-*.png") if self.samples.is_dir() else ():
            match = GRID_NAME.fullmatch(path.name)
            if match:
                found[path.name] = (int(match.group(1)), "validation" + (f"/{match.group(2)}" if match.group(2) else ""))
        return found

    def log_grids(self, below: float, at: int | None = None) -> dict:
        """Log the new grids of steps below `below` at their own step; return those of step `at` as a row to add."""
        row = {}
        for name, (step, key) in sorted(self.grids().items()):
            if name in self.logged or not (step < below or step == at):
                continue
            self.logged.add(name)
            image = self.wandb.Image(str(self.samples / name), caption=f"step {step}")
            if step == at:
                row[key] = image
            else:
                self.run.log({key: image}, step=step)
        return row

    def log(self, record: dict) -> None:
        step = record["step"]
        row = self.log_grids(below=step, at=step)
        self.run.log({key: value for key, value in record.items() if key != "step"} | row, step=step)

    def finish(self) -> None:
        self.log_grids(below=float("inf"))  # the grid of the last step, written after its record
        self.run.finish()


def wandb_log(cfg: TrainConfig, run_dir: Path) -> WandbLog | None:
    """The W&B run of this training run when run.wandb is on and wandb is installed (a warning when it is not)."""
    if not cfg.run.wandb:
        return None
    try:
        import wandb
    except ImportError:
        warnings.warn("run.wandb=true but wandb is not installed (pip install wandb); logging to metrics.jsonl only", stacklevel=2)
        return None
    return WandbLog(wandb, cfg, run_dir)
