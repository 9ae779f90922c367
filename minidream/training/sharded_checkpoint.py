"""Checkpoints of FSDP runs with torch.distributed.checkpoint (DCP): every rank writes its shards.

    checkpoints/step-NNNNNNNN/
      dcp/         DCP's files: the trained weights, the optimizer state (keyed by parameter
                   name) and the EMA, each rank writing its own part in parallel
      trainer.pt   the same counters as a DDP checkpoint (checkpoint.TrainerState.counters)
      checksums.json  every file's sha256, as in a DDP checkpoint (checkpoint.damage verifies them)

Atomic as DDP checkpoints are: all ranks write into `step-N.tmp`, and after a barrier rank 0
renames it, so a step folder exists only when every shard is in it (the run directory must be
on a filesystem all ranks share). Resharding: DCP stores each tensor with its global shape and
loads into whatever layout the loading run has — N shards, or whole tensors in a process
without FSDP — so a checkpoint resumes on any world size, and under DDP. The other way round,
a DDP checkpoint (whole tensors, index-keyed optimizer state) loads into sharded modules by
parameter name.

The data needs no resharding: the cursor is global (order.py), so a resumed run on W'
ranks takes the same next global batch as the saving run on W, and every sample's noise comes
from its own generator keyed by (seed, epoch, position), not by rank. With the same global batch
the continued run is the uninterrupted one's, up to the fp32 rounding of reductions summed in
another order.
"""

import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import distribute_tensor

from minidream.files import give_umask_modes
from minidream.training.checkpoint import (
    EMA_FILE,
    TrainerState,
    checkpoint_dir,
    partial_dir,
    read_counters,
    restore_counters,
    write_checksums,
    write_failed,
)
from minidream.training.distributed import barrier
from minidream.training.sharding import ShardedEMA

DCP_FOLDER = "dcp"


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_FOLDER).is_dir()


def _root(state: TrainerState) -> nn.Module:
    """The trained modules under one root, so parameter names are `<module>.<parameter>` (the EMA's names)."""
    return nn.ModuleDict(state.modules)


def _ema_state(state: TrainerState) -> dict[str, torch.Tensor]:
    ema = state.ema
    return ema.sharded_shadow() if isinstance(ema, ShardedEMA) else dict(zip(ema.names, ema.shadow))


def save_sharded(run_dir: Path, state: TrainerState, rng: list[dict], is_main: bool) -> Path:
    """Write `state` as the DCP checkpoint of its step, from every rank (all must call); `rng`
    holds every rank's RNG states. Returns the step folder. A failure on any rank leaves only
    the `.tmp` folder, which resume ignores and the next save removes."""
    final = checkpoint_dir(run_dir, state.step)
    partial = partial_dir(final)
    try:
        if is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        model, optimizer = get_state_dict(_root(state), state.optimizer)
        content = {"model": model, "optimizer": optimizer}
        if state.ema is not None:
            content["ema"] = _ema_state(state)
        dcp.save(content, checkpoint_id=partial / DCP_FOLDER)
        if is_main:
            torch.save(state.counters(rng), partial / "trainer.pt")
        barrier()  # every rank's shards are written
        if is_main:
            write_checksums(partial)
            give_umask_modes(partial)  # DCP's files are written without atomic_folder, which does this
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
        barrier()
    except OSError as error:
        raise write_failed(final, error) from None
    return final


def load_sharded(path: Path, state: TrainerState, rank: int, world_size: int) -> None:
    """Restore `state` from the DCP checkpoint `path` into its modules' layout, sharded or not (all ranks call)."""
    saved = read_counters(path, state.setup, world_size)
    root = _root(state)
    model, optimizer = get_state_dict(root, state.optimizer)
    content = {"model": model, "optimizer": optimizer}
    if state.ema is not None:
        content["ema"] = _ema_state(state)  # loaded in place: these share the EMA's storage
    dcp.load(content, checkpoint_id=path / DCP_FOLDER)
    set_state_dict(root, state.optimizer, model_state_dict=content["model"], optim_state_dict=content["optimizer"])
    if state.ema is not None:
        state.ema.updates.copy_(saved["ema_updates"])
    restore_counters(saved, state, rank)


def load_whole_into_sharded(path: Path, state: TrainerState, rank: int, world_size: int) -> None:
    """Restore sharded modules from a DDP checkpoint (whole tensors): each rank keeps its shards."""
    saved = read_counters(path, state.setup, world_size)
    root = _root(state)
    model = {f"{name}.{key}": value for name in state.modules for key, value in load_file(path / f"{name}.safetensors").items()}
    by_index = torch.load(path / "optimizer.pt", weights_only=True)
    # optimizer.pt numbers the parameters in the optimizer's own order; DCP's format names them.
    names = {id(p): name for name, p in root.named_parameters()}
    order = [names[id(p)] for group in state.optimizer.param_groups for p in group["params"]]
    optimizer = {
        "state": {order[index]: value for index, value in by_index["state"].items()},
        "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in by_index["param_groups"]],
    }
    set_state_dict(root, state.optimizer, model_state_dict=model, optim_state_dict=optimizer,
                   options=StateDictOptions(full_state_dict=True))
    if state.ema is not None:
        whole = load_file(path / EMA_FILE)
        for name, shadow, reference in zip(state.ema.names, state.ema.shadow, state.ema.references):
            shadow.copy_(distribute_tensor(whole[name].to(shadow.device), reference.device_mesh, reference.placements).to_local())
        state.ema.updates.copy_(saved["ema_updates"])
    restore_counters(saved, state, rank)
