"""The optimizers a run can choose (`train.optimizer`), and the fused back pass (`train.fused_backward`).

Memory per trained parameter beyond the fp32 weights (4 bytes), by arithmetic:
  adamw                      gradient 4 + two fp32 moments 8        = 12 bytes
  adamw + fused_backward     two fp32 moments 8, one gradient alive ~  8 bytes
  adamw8bit                  gradient 4 + two 8-bit moments 2       ~  6 bytes
  adamw8bit + fused_backward two 8-bit moments 2                    ~  2 bytes
What bench/optimizer_memory.py measures is in BENCHMARKS.md, "Optimizer memory".
"""

import torch

from minidream.config import OPTIMIZERS
from minidream.training.step import step_unless


class OptimizerError(ValueError):
    """An optimizer setting that cannot be honoured, with what to do instead (one line)."""


def make_optimizer(
    param_groups: list[dict], name: str, betas: tuple[float, float], eps: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW (Loshchilov & Hutter 2019) over `param_groups` (each with its "params" and "lr").

    "adamw": torch's fused AdamW, one kernel for all weights, that can skip a step on the
    device (training.step.step_unless). "adamw8bit": bitsandbytes' AdamW8bit (Dettmers et al.
    2022, "8-bit Optimizers via Block-wise Quantization"): the moments in 8 bits per 256-value
    block (tensors under 4096 values keep fp32 moments). It is the optional dependency that
    diffusers' `--use_8bit_adam` uses too. It has no on-device skip, so skipping a non-finite
    step reads the flag on the host.
    """
    if name == "adamw":
        return torch.optim.AdamW(param_groups, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise OptimizerError("train.optimizer=adamw8bit needs the bitsandbytes package: pip install bitsandbytes") from None
        return bitsandbytes.optim.AdamW8bit(param_groups, betas=betas, eps=eps, weight_decay=weight_decay)
    raise OptimizerError(f"unknown train.optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


class FusedBackward:
    """OneTrainer's "fused back pass": each parameter is stepped inside backward, as soon as its
    gradient is complete, by an optimizer of its own, and its gradient is freed right away.

    So the gradients of the whole model never exist at once. `make` builds one optimizer from a
    one-parameter group list, e.g. `lambda groups: make_optimizer(groups, "adamw", ...)`.
    Use: `fused.set_lr_factor(f)` before backward (it replaces the LR scheduler), `loss.backward()`
    (this is the step), then read `fused.nonfinite` (0-d bool: some gradient was not finite).

    What it cannot do, because no moment exists with every gradient present:
    - global-norm gradient clipping (the norm needs all gradients);
    - gradient accumulation (each backward steps at once);
    - DDP (its all-reduce lands after the hook has stepped on the local gradient);
    - fp16 GradScaler (its unscale and overflow check are per optimizer step).
    A parameter whose gradient is not finite is not stepped (fused AdamW: decided on the device;
    adamw8bit: the host reads each parameter's flag); the others of that backward are.
    `state_dict()` / `load_state_dict()` and `param_groups` make it checkpoint like an optimizer.
    """

    def __init__(self, param_groups: list[dict], make):
        self.optimizers: dict[torch.Tensor, torch.optim.Optimizer] = {}
        for group in param_groups:
            settings = {key: value for key, value in group.items() if key != "params"}
            for p in group["params"]:
                self.optimizers[p] = make([{"params": [p], **settings}])
        self.base_lrs = [opt.param_groups[0]["lr"] for opt in self.optimizers.values()]
        first = next(iter(self.optimizers))
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=first.device)
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in self.optimizers]

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def set_lr_factor(self, factor: float) -> None:
        """Every parameter's learning rate := its group's base lr * factor (training.step.lr_factor)."""
        for opt, base in zip(self.optimizers.values(), self.base_lrs):
            opt.param_groups[0]["lr"] = base * factor

    def reset_nonfinite(self) -> None:
        self.nonfinite.zero_()

    @torch.no_grad()
    def _step(self, p: torch.Tensor) -> None:
        found = ~torch.isfinite(p.grad).all()
        self.nonfinite |= found
        step_unless(self.optimizers[p], found)
        p.grad = None  # freed now: the next parameter's gradient can reuse the memory

    def state_dict(self) -> dict:
        return {"per_parameter": [opt.state_dict() for opt in self.optimizers.values()]}

    def load_state_dict(self, state: dict) -> None:
        states = state["per_parameter"]
        if len(states) != len(self.optimizers):
            raise OptimizerError(
                f"optimizer state has {len(states)} per-parameter optimizers, this run trains {len(self.optimizers)} tensors; "
                "resume with the settings the run was started with (train.fused_backward, train.train_text_encoder)"
            )
        for opt, opt_state in zip(self.optimizers.values(), states):
            opt.load_state_dict(opt_state)

    def remove(self) -> None:
        """Take the hooks off: backward no longer steps."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
