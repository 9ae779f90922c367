"""Classifier-free guidance (Ho & Salimans 2022) from one batched model call.

The unconditional and conditional predictions come from a single forward over a doubled
batch, unconditional half first, so the UNet runs once per sampling step. The conditioning is
the model's arguments after x and t, doubled one by one: the UNet's text context, and for SDXL
also its vector conditioning y (diffusers' SDXL pipeline doubles embeddings, pooled vectors and
time ids alike, negative first).
"""

from collections.abc import Callable, Sequence

import torch


def double_batch(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Stack the unconditional half before the conditional half: 2B x ..."""
    return torch.cat([uncond, cond])


def split_batch(doubled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `double_batch`: 2B x ... -> (uncond B x ..., cond B x ...)."""
    uncond, cond = doubled.chunk(2)
    return uncond, cond


def combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + s * (cond - uncond): s = 1 gives cond, s = 0 gives uncond."""
    return uncond + scale * (cond - uncond)


def rescale(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules...", eq. 15-16).

    Matches the per-sample standard deviation of the guided prediction to the conditional
    one (over all non-batch dims), then blends: phi = 0 leaves `guided` unchanged.
    """
    dims = tuple(range(1, guided.dim()))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def guided_prediction(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    t: torch.Tensor,
    uncond: Sequence[torch.Tensor],
    cond: Sequence[torch.Tensor],
    scale: float,
    rescale_phi: float = 0.0,
) -> torch.Tensor:
    """The guided model output at (x, t), from one call of `model(x, t, *conditioning)`.

    uncond, cond: the model's arguments after x and t, (context,) or (context, y), each B x ...
    With scale 1 the unconditional half would not change the result, so it is skipped and
    the batch is not doubled.
    """
    if scale == 1.0:
        return model(x, t, *cond)
    t = t.expand(x.shape[0]) if t.dim() == 0 else t
    doubled = [double_batch(u, c) for u, c in zip(uncond, cond, strict=True)]
    out = model(double_batch(x, x), double_batch(t, t), *doubled)
    uncond_out, cond_out = split_batch(out)
    guided = combine(uncond_out, cond_out, scale)
    return rescale(guided, cond_out, rescale_phi) if rescale_phi > 0 else guided
