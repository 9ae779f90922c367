"""The optimizers a run can choose (`train.optimizer`), and the fused back pass (`train.fused_backward`).

Memory per trained parameter beyond the fp32 weights (4 bytes), by arithmetic:
  adamw                      gradient 4 + two fp32 moments 8        = 12 bytes
  adamw + fused_backward     two fp32 moments 8, one gradient alive ~  8 bytes
  adamw8bit                  gradient 4 + two 8-bit moments 2       ~  6 bytes
  adamw8bit + fused_backward two 8-bit moments 2                    ~  2 bytes
  prodigy                    gradient 4 + two moments, s, the start weights p0 16 = 20 bytes
  lion                       gradient 4 + one momentum 4            =  8 bytes
  adamw-schedulefree         gradient 4 + z 4 + second moment 4     = 12 bytes (+4 during its for-each step)
  adafactor                  gradient 4 + row and column statistics ~  4 bytes (a 1-d tensor keeps a full one)
What bench/optimizer_memory.py measures is in BENCHMARKS.md, "Optimizer memory".
"""

import importlib

import torch

from minidream.config import OPTIMIZERS, TrainSection, optimizer_settings
from minidream.training.step import lr_factor, step_unless

# train.optimizer -> (its pip package, module, class). adamw and adafactor are torch's own.
CLASSES = {
    "adamw": (None, "torch.optim", "AdamW"),
    "adamw8bit": ("bitsandbytes", "bitsandbytes.optim", "AdamW8bit"),  # Dettmers et al. 2022
    "prodigy": ("prodigyopt", "prodigyopt", "Prodigy"),  # Mishchenko & Defazio 2024
    "lion": ("lion-pytorch", "lion_pytorch", "Lion"),  # Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"
    "adamw-schedulefree": ("schedulefree", "schedulefree", "AdamWScheduleFree"),  # Defazio et al. 2024
    "adafactor": (None, "torch.optim", "Adafactor"),  # Shazeer & Stern 2018
}


class OptimizerError(ValueError):
    """An optimizer setting that cannot be honoured, with what to do instead (one line)."""


def optimizer_class(name: str) -> type:
    """The class train.optimizer=`name` builds; a missing optional package is named with its pip command."""
    if name not in CLASSES:
        raise OptimizerError(f"unknown train.optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    package, module, attribute = CLASSES[name]
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError:
        raise OptimizerError(f"train.optimizer={name} needs the {package} package: pip install {package}") from None


def make_optimizer(param_groups: list[dict], train: TrainSection) -> torch.optim.Optimizer:
    """train.optimizer over `param_groups` (each with its "params" and "lr"), with its settings
    (config.optimizer_settings).

    "adamw": torch's fused AdamW (Loshchilov & Hutter 2019), one kernel for all weights, that can
    skip a step on the device (training.step.step_unless). Every other optimizer skips a
    non-finite step by reading the flag on the host, once per step; Prodigy and torch's Adafactor
    also read values per parameter inside step() (docs/training.md, Optimizers: host reads).
    "adamw8bit": the moments in 8 bits per 256-value block (tensors under 4096 values keep fp32
    moments), the optional dependency of diffusers' `--use_8bit_adam`.
    "adamw-schedulefree" is returned in its train mode (the library starts in eval mode and
    refuses to step there); training.schedule_free swaps in its evaluation weights.
    """
    optimizer_type = optimizer_class(train.optimizer)
    settings = optimizer_settings(train) | ({"fused": True} if train.optimizer == "adamw" else {})
    optimizer = optimizer_type(param_groups, **settings)
    if train.optimizer == "adamw-schedulefree":
        optimizer.train()  # no step taken yet: only the mode flag changes
    return optimizer


class FusedBackward:
    """OneTrainer's "fused back pass": each parameter is stepped inside backward, as soon as its
    gradient is complete, by an optimizer of its own, and its gradient is freed right away.

    So the gradients of the whole model never exist at once. `make` builds one optimizer from a
    one-parameter group list, e.g. `lambda groups: make_optimizer(groups, train_section)`.
    Use: `fused.set_lr_factor(f)` before backward (it replaces the LR scheduler), `loss.backward()`
    (this is the step), then read `fused.nonfinite` (0-d bool: some gradient was not finite).

    What it cannot do, because no moment exists with every gradient present:
    - global-norm gradient clipping (the norm needs all gradients);
    - gradient accumulation (each backward steps at once);
    - DDP (its all-reduce lands after the hook has stepped on the local gradient);
    - fp16 GradScaler (its unscale and overflow check are per optimizer step).
    A parameter whose gradient is not finite is not stepped (fused AdamW: decided on the device;
    any other: the host reads each parameter's flag); the rest of that backward are.
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


def build_optimizer(groups: list[dict], train: TrainSection) -> tuple[torch.optim.Optimizer | FusedBackward, torch.optim.lr_scheduler.LRScheduler | None]:
    """train.optimizer over the groups and its LR schedule. fused_backward: the optimizer steps
    inside backward, one weight at a time, its LR set per step (no scheduler)."""
    def build(param_groups):
        return make_optimizer(param_groups, train)

    if train.fused_backward:
        return FusedBackward(groups, build), None
    optimizer = build(groups)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, train.lr_schedule, train.warmup_steps, train.max_steps))
