"""The optimizer step and what the loop needs around it: host-to-device copies, the skip of a
non-finite step, the LR factor.

    grad_norm, skip = optimizer_step(optimizer, scaler, tcfg.max_grad_norm, sharded)

No function here makes the host wait for the GPU: a non-finite step is skipped on the device.
"""

import math

import torch

from minidream.config import LR_SCHEDULES
from minidream.training import sharding


def optimizer_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, max_grad_norm: float | None, sharded: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """After the accumulation's backward passes: unscale, clip by the global norm, step unless a
    gradient is not finite, zero. Returns (grad_norm, skip), 0-d tensors on the device.

    `sharded`: the weights are FSDP shards; the step runs on the local shards and the norm is
    summed over ranks (sharding.local_shards, clip_grad_norm). With `optimizer` a fused backward
    (optimizers.FusedBackward, known by its `nonfinite` flag), backward has already stepped each
    weight and no global norm exists: grad_norm is NaN and skip says whether any step was skipped.
    """
    if hasattr(optimizer, "nonfinite"):
        skip = optimizer.nonfinite.clone()
        optimizer.reset_nonfinite()
        return torch.full((), float("nan"), device=skip.device), skip
    scaler.unscale_(optimizer)
    with sharding.local_shards(optimizer, sharded) as stepped:
        grad_norm = sharding.clip_grad_norm(stepped, max_grad_norm or float("inf"), sharded)  # inf: measure only
        # The same on every rank: DDP has averaged the gradients (FSDP summed the shards' squares), and a NaN loss anywhere makes them NaN.
        skip = ~torch.isfinite(grad_norm)
        step_unless(optimizer, skip)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skip


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
    raise ValueError(f"unknown lr schedule {schedule_name!r}; choose one of {', '.join(LR_SCHEDULES)}")
