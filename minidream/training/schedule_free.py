"""Schedule-free AdamW's two sets of weights (Defazio et al. 2024, "The Road Less Scheduled").

The optimizer trains at y, an interpolation of its fast iterate z and the average x of the z
sequence; x is the model to use (`optimizer.eval()` moves the parameters to it, `train()` back).
The library's README asks for eval mode around validation and checkpoint saves. Its round trip
y -> x -> y is not exact (lerps: 6e-8 apart after one trip in fp32), so a resumed or validated
run would drift from an uninterrupted one; here the training weights are kept as a copy and
copied back instead.

    with evaluation_weights(optimizer):   # validation grids, evaluation, checkpoints, export
        ...
    restore_training_weights(optimizer)   # after loading a checkpoint written inside the block

Every other optimizer passes through unchanged.
"""

import contextlib
from collections.abc import Iterator

import torch

from minidream.training.optimizers import FusedBackward

KEPT = "training_weights"  # the state entry holding y while the parameters hold x (saved with a checkpoint)


def schedule_free_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The schedule-free optimizers in `optimizer` (a fused backward has one per parameter)."""
    optimizers = list(optimizer.optimizers.values()) if isinstance(optimizer, FusedBackward) else [optimizer]
    return [opt for opt in optimizers if "train_mode" in opt.defaults]


@contextlib.contextmanager
def evaluation_weights(optimizer) -> Iterator[None]:
    """The parameters hold schedule-free's evaluation weights x inside the block; the training
    weights y are kept in the optimizer state meanwhile and put back bit for bit afterwards."""
    optimizers = schedule_free_optimizers(optimizer)
    with torch.no_grad():
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if "z" in opt.state.get(p, {}):  # stepped at least once; before that x = y
                        opt.state[p][KEPT] = p.detach().clone()
            opt.eval()
    try:
        yield
    finally:
        restore_training_weights(optimizer)


@torch.no_grad()
def restore_training_weights(optimizer) -> None:
    """The parameters back to the kept training weights, the optimizer back in train mode."""
    for opt in schedule_free_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                kept = opt.state.get(p, {}).pop(KEPT, None)
                if kept is not None:
                    p.copy_(kept)
            group["train_mode"] = True
