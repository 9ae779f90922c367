"""The run's checkpoint policy, in one place (torchtitan's CheckpointManager role): which checkpoint
a run resumes from, when a save is due, how every rank takes part, and which old ones go.

    checkpointer = Checkpointer(run_dir, cfg, env, dcp=...)   # refuses a fresh run over old checkpoints
    resumed_from = checkpointer.load(state)                    # None: a fresh start
    if checkpointer.due(step, max_steps): checkpointer.save(state)

The two formats stay in their files: whole tensors (checkpoint.py, one writer) and DCP shards
(sharded_checkpoint.py, every rank writes); both write `step-N.tmp` first and rename it when
complete. A DCP checkpoint loads into any layout, and a whole-tensor one into sharded modules.
"""

import os
import re
import shutil
import warnings
from pathlib import Path

from minidream.config import TrainConfig
from minidream.files import prove_writable
from minidream.training import sharded_checkpoint
from minidream.training.checkpoint import (
    CHECKSUMS,
    CheckpointError,
    TrainerState,
    capture_rng,
    damage,
    load_checkpoint,
    partial_dirs,
    save_checkpoint,
)
from minidream.training.distributed import Distributed, barrier, gather_objects

NAME = re.compile(r"^step-(\d{8})$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Incomplete (`.tmp`) ones are reported and skipped."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    for partial in partial_dirs(run_dir):
        warnings.warn(f"ignoring incomplete checkpoint {partial} (interrupted while writing)", stacklevel=2)
    return sorted(p for p in folder.iterdir() if NAME.match(p.name) and p.is_dir())


def rotate(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never the newest one), and
    the partial folders that interrupted writes left. Call after a save: no write is under way."""
    for partial in partial_dirs(run_dir):
        shutil.rmtree(partial, ignore_errors=True)
    for old in list_checkpoints(run_dir)[: -max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def restart_resume(resume: str, run_has_checkpoints: bool) -> str:
    """run.resume as this process applies it. A worker group torchrun restarted (--max-restarts)
    resumes from the run's newest complete checkpoint whatever run.resume says: the checkpoints
    there are this job's own, written before the failure — going back to a run.resume=PATH it
    started from would redo every step since. Before the run has written one, a restart starts as
    the first launch did (from PATH, or afresh: `latest` would fail on an empty run). A first launch
    keeps run.resume, so re-running a finished or foreign run directory with resume=none is still
    refused, never continued."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    if not restarted:
        return resume
    return "auto" if run_has_checkpoints or resume in ("none", "latest", "auto") else resume


def resolve_resume(resume: str, found: list[Path]) -> Path | None:
    """`run.resume`: "none"; "latest" (the newest of `found` that is intact, with a warning naming each
    damaged one passed over); "auto" (the same: None when there is none, a fresh start); or a
    checkpoint folder, which must be intact. The files are verified against their checksums."""
    if resume == "none":
        return None
    if resume not in ("latest", "auto"):
        path = Path(resume)
        if not (path / "trainer.pt").is_file() and not (path / CHECKSUMS).is_file():
            raise CheckpointError(f"run.resume={resume}: not a checkpoint folder (no trainer.pt); use latest or a checkpoints/step-* folder")
        if problem := damage(path):
            raise CheckpointError(f"run.resume={resume}: {problem}; resume from another checkpoints/step-* folder")
        return path
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is damaged ({problem}); trying the one before it", stacklevel=2)
    if found:
        raise CheckpointError(f"run.resume={resume}: every checkpoint in {found[0].parent} is damaged; "
                              "start afresh in another run.output_dir")
    return None


def run_setup(cfg: TrainConfig, unet_config, trained: list[str]) -> dict:
    """What a resumed run must share with its checkpoint (TrainerState.setup); options at their
    defaults are left out, so checkpoints of runs without them stay resumable."""
    setup = {"architecture": repr(unet_config), "trained": sorted(trained)}
    if cfg.lora.rank:
        lora = cfg.lora
        setup["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "targets": lora.targets, "text_encoder_rank": lora.text_encoder_rank}
    if cfg.train.ema_decay is not None:
        setup["ema"] = True
    if cfg.train.fused_backward or cfg.train.optimizer != "adamw":  # another optimizer state format
        setup["optimizer"] = f"{cfg.train.optimizer}{' fused_backward' if cfg.train.fused_backward else ''}"
    data = cfg.data
    if data.subjects or data.buckets:  # they decide the data order the checkpoint's cursor points into
        setup["data"] = {
            "subjects": [[s.name or Path(s.instance_dir).name, s.repeats] for s in data.subjects],
            "buckets": [data.resolution, data.bucket_step, data.max_aspect] if data.buckets else None,
        }
    return setup


class Checkpointer:
    """The checkpoints of one run directory.

    `dcp`: checkpoints are written with DCP, every rank its shards (train.sharding=fsdp, even on
    one process); `sharded`: this process's trained weights really are FSDP shards (2+ ranks).
    """

    def __init__(self, run_dir: Path, cfg: TrainConfig, env: Distributed, dcp: bool, sharded: bool):
        self.run_dir, self.env, self.dcp, self.sharded = Path(run_dir), env, dcp, sharded
        self.every, self.keep_last = cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last
        if env.is_main:  # before anything expensive happens (checkpoints/ itself is made by the first save)
            try:
                prove_writable(self.run_dir)
            except OSError as error:
                raise CheckpointError(f"run.output_dir {self.run_dir} is not writable ({error.strerror or error})") from None
        barrier()
        self.found = list_checkpoints(self.run_dir)  # once: it warns about interrupted writes
        self.resume = restart_resume(cfg.run.resume, bool(self.found))
        if self.resume == "none" and self.found:
            raise CheckpointError(
                f"{self.run_dir} already holds checkpoints of an earlier run; continue it with run.resume=latest "
                "or start afresh in another run.output_dir"
            )
        if self.resume == "latest" and not self.found:  # a typo in run.output_dir must not train from scratch
            raise CheckpointError(
                f"run.resume=latest: {self.run_dir / 'checkpoints'} holds no complete checkpoint; check run.output_dir, "
                "or use run.resume=auto to continue when there is one and start afresh when there is none"
            )
        self.resume_from = self._verified_target()

    def due(self, step: int, max_steps: int) -> bool:
        """Whether the step just done is saved: every checkpoint.every_n_steps, and the last one."""
        return step % self.every == 0 or step == max_steps

    def _verified_target(self) -> Path | None:
        """The checkpoint to resume, its files verified now, before any model loads: the main rank
        reads each file once and every rank gets its verdict."""
        verdict = None
        if self.env.is_main:
            try:
                verdict = resolve_resume(self.resume, self.found)
            except CheckpointError as error:
                verdict = error
        verdict = gather_objects(verdict)[0]
        if isinstance(verdict, CheckpointError):
            raise verdict
        return verdict

    def load(self, state: TrainerState) -> Path | None:
        """Restore `state` from the checkpoint run.resume names (all ranks call); returns its folder,
        or None for a fresh start. Either format loads into this run's layout."""
        path, env = self.resume_from, self.env
        if path is None:
            return None
        if sharded_checkpoint.is_sharded_checkpoint(path):  # DCP reshards into any layout
            sharded_checkpoint.load_sharded(path, state, env.rank, env.world_size)
        elif self.sharded:  # whole tensors, each rank keeping its shards
            sharded_checkpoint.load_whole_into_sharded(path, state, env.rank, env.world_size)
        else:
            load_checkpoint(path, state, env.rank, env.world_size)
        return path

    def save(self, state: TrainerState) -> Path:
        """Write `state` as the checkpoint of its step (all ranks call: each hands over its RNG
        states; with DCP each writes its shards), then keep the newest checkpoint.keep_last."""
        rng = gather_objects(capture_rng())
        env = self.env
        if self.dcp:
            saved = sharded_checkpoint.save_sharded(self.run_dir, state, rng, env.is_main)
        else:
            saved = save_checkpoint(self.run_dir, state, rng) if env.is_main else None
        if env.is_main:
            rotate(self.run_dir, self.keep_last)
        barrier()
        return saved
