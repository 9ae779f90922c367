"""The pieces of a DreamBooth optimizer step, each a plain function train.py composes.

Randomness: every training sample gets its own CPU generator keyed by (seed, epoch, its
position in the epoch's shuffled order, instance/class part). Its crop, flip, VAE sample,
timestep and noise all come from that generator. So the draws of a sample do not depend on
which rank processes it or on the batch it lands in: N processes reproduce one process with
the same global batch, and a resumed run reproduces the uninterrupted one.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch

from minidream.training.data import epoch_order

MASK64 = (1 << 63) - 1


def sample_generator(seed: int, epoch: int, position: int, part: int) -> torch.Generator:
    """The generator of one training sample (part 0: instance image, 1: class image)."""
    key = (((seed * 1_000_003 + epoch) * 1_000_003 + position) * 2 + part) & MASK64
    return torch.Generator("cpu").manual_seed(key)


@dataclass(frozen=True)
class Cursor:
    """Where the run is in the data: the epoch, and how many items of its global shuffled order
    all ranks together have used. The same on every rank and for any world size, so a checkpoint
    resumes on another number of ranks (with a global batch that divides it) at the same samples."""

    epoch: int = 0
    position: int = 0


@dataclass(frozen=True)
class Item:
    """One dataset item drawn for training: which item, and the key of its randomness."""

    index: int  # into the dataset: instance index % n_instance, class index % n_class
    epoch: int
    position: int  # in the epoch's global shuffled order


def take_items(
    cursor: Cursor, count: int, length: int, seed: int, rank: int, world_size: int,
    shard: Callable[[int], list[int]] | None = None,
) -> tuple[list[Item], Cursor]:
    """This rank's `count` items of the next global batch (count x world_size items), moving to
    the next epoch when the epoch's usable items run out; returns them and the run's new cursor.

    Rank r's shard of an epoch is positions r, r + W, r + 2W, ... of the shuffled order
    (`epoch_order`, or `shard(epoch)`: this rank's every-W-th of another global order of up to
    `length` items, e.g. plan.DataPlan's one-bucket batches), so in lockstep the ranks take
    consecutive runs of the global order: the
    global batch starting at position P holds positions P .. P + count * W - 1 whatever W is.
    (The epoch ends at the first batch that would pass length // W * W; for any W dividing the
    global batch that is the same batch as for one process, so the order never depends on W.)
    """
    shard_length = length // world_size
    if shard_length < count:
        raise ValueError(
            f"{length} training items cannot give {world_size} process(es) {count} item(s) each per step; "
            "add images, or lower train.batch_size or the number of processes"
        )
    if cursor.position % world_size:
        raise ValueError(f"data position {cursor.position} cannot be split evenly over {world_size} processes")
    if cursor.position + count * world_size > shard_length * world_size:
        cursor = Cursor(cursor.epoch + 1, 0)
    order = epoch_order(length, cursor.epoch, seed, rank, world_size) if shard is None else shard(cursor.epoch)
    first = cursor.position // world_size
    items = [Item(order[j], cursor.epoch, rank + j * world_size) for j in range(first, first + count)]
    return items, Cursor(cursor.epoch, cursor.position + count * world_size)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, copied without making the host wait for the GPU.

    A copy from ordinary (pageable) memory to CUDA blocks until the GPU's queue has drained;
    from pinned memory with non_blocking=True it is queued like a kernel and the CPU runs ahead.
    """
    if tensor.device.type != "cpu" or device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step(), unless the 0-d tensor `skip` is true (a non-finite gradient norm).

    The decision is taken on the device: a fused AdamW reads `found_inf` (the hook
    torch.amp.GradScaler uses) and leaves weights, moments and step counts as they were. Any
    other optimizer needs the host to read `skip` first.
    """
    if not optimizer.defaults.get("fused"):
        if not bool(skip):
            optimizer.step()
        return
    optimizer.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def dreambooth_loss(
    prediction: torch.Tensor, target: torch.Tensor, num_instance: int, prior_loss_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ruiz et al. 2023 eq. 2: MSE on the instance images + weight * MSE on the class images.

    The batch holds the instance samples first, then (with prior preservation) the class
    samples, so one forward serves both. Computed in fp32 whatever the AMP dtype.
    Returns (total loss, instance loss, prior loss; 0 without class samples).
    """
    errors = (prediction.float() - target.float()) ** 2
    loss_instance = errors[:num_instance].mean()
    if num_instance == prediction.shape[0]:
        return loss_instance, loss_instance, torch.zeros((), device=prediction.device)
    loss_prior = errors[num_instance:].mean()
    return loss_instance + prior_loss_weight * loss_prior, loss_instance, loss_prior


def lr_factor(step: int, schedule_name: str, warmup_steps: int, max_steps: int) -> float:
    """Multiplier on the base learning rate at optimizer step `step` (0-based).

    Linear warmup from 0 over warmup_steps, then constant, linear decay to 0, or half a cosine.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule_name == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    if schedule_name == "linear":
        return max(0.0, 1.0 - progress)
    if schedule_name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown lr schedule {schedule_name!r}; choose constant, linear or cosine")
