"""An exponential moving average (EMA) of the trained weights, kept on their device.

    ema_n+1 = d_n * ema_n + (1 - d_n) * theta_n+1,   d_n = min(decay, (1 + n) / (10 + n)) with warmup

(n counts the updates applied so far; without warmup d_n = decay.) The update is a few for-each
kernels over all tensors, driven by 0-d device tensors — the update count, the decay, the skip
flag — so it never makes the host wait for the GPU. A step the training loop skipped (non-finite
gradients: its on-device `skip` flag) leaves the average and the count exactly as they were.
Any list of parameters works: a full UNet, or only the LoRA adapters.
"""

import contextlib
from collections.abc import Iterable, Iterator

import torch


def ema_decay(updates: torch.Tensor, decay: float, warmup: bool) -> torch.Tensor:
    """The decay of the next update after `updates` applied ones (a tensor): min(decay, (1 + n) / (10 + n)).

    The warmup is the schedule of diffusers' EMAModel with use_ema_warmup=False (and of the
    original LDM training code): early averages follow the weights closely, so the EMA is not
    dominated by the random or pretrained starting point. Computed in float64 on `updates`' device.
    """
    constant = torch.full_like(updates, decay, dtype=torch.float64)
    if not warmup:
        return constant
    n = updates.to(torch.float64)
    return torch.minimum(constant, (1 + n) / (10 + n))


class EMA:
    """The EMA of `named_parameters` (name -> tensor, e.g. module.named_parameters() of what trains).

    The average starts as a copy of the weights, in their dtype and on their device. Call
    `update(skip)` after each optimizer step that should count (every `train.ema_every` steps:
    the caller decides, with its host-side step number); `swapped_in()` puts the averaged
    weights into the model for validation or export; `state_dict()` / `load_state_dict()`
    carry it across a resume bit for bit.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.Tensor]], decay: float, warmup: bool):
        if not 0 < decay < 1:
            raise ValueError(f"train.ema_decay must be in (0, 1), e.g. 0.9999; got {decay}")
        named = list(named_parameters)
        if not named:
            raise ValueError("EMA needs at least one parameter")
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.warmup = decay, warmup
        self.updates = torch.zeros((), dtype=torch.int64, device=self.params[0].device)

    @torch.no_grad()
    def update(self, skip: torch.Tensor | None = None) -> None:
        """ema <- lerp(ema, weights, 1 - d_n), unless the 0-d bool tensor `skip` is true.

        A skipped update has weight exactly 0: every average value is kept as it was (bit for bit;
        only a -0.0 may come back as +0.0), and the update count does not advance.
        """
        weight = 1 - ema_decay(self.updates, self.decay, self.warmup)
        if skip is not None:
            weight = torch.where(skip, torch.zeros_like(weight), weight)
        # One 0-d weight per tensor (the List overload): a tensor passed as the Scalar weight
        # would be read back to the host first.
        per_dtype = {dtype: weight.to(dtype) for dtype in {s.dtype for s in self.shadow}}
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], [per_dtype[s.dtype] for s in self.shadow])
        self.updates += 1 if skip is None else (~skip).to(torch.int64)

    def state_dict(self) -> dict:
        """{"shadow": {name: averaged tensor}, "updates": 0-d int64 tensor}: tensors only (weights_only loads)."""
        return {"shadow": dict(zip(self.names, self.shadow)), "updates": self.updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Copy a state_dict() back in place (onto this EMA's device); the names must match exactly."""
        names = set(state["shadow"])  # by name: files (safetensors) may hold them in another order
        if names != set(self.names):
            missing, unexpected = sorted(set(self.names) - names), sorted(names - set(self.names))
            raise ValueError(
                f"EMA state does not match the trained parameters (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "resume with the same train.train_text_encoder / LoRA settings the run was started with"
            )
        for name, shadow in zip(self.names, self.shadow):
            if state["shadow"][name].shape != shadow.shape:
                raise ValueError(f"EMA state for {name} has shape {tuple(state['shadow'][name].shape)}, expected {tuple(shadow.shape)}")
            shadow.copy_(state["shadow"][name])
        self.updates.copy_(state["updates"])

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the parameters hold the averaged weights; afterwards their own again, bit for bit.

        The storages are exchanged, not copied: no extra memory, and the optimizer (keyed by the
        Parameter objects) is unaffected. Do not train inside the block.
        """
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for i, p in enumerate(self.params):
            p.data, self.shadow[i] = self.shadow[i], p.data
