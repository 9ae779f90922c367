"""Training-loss recipes as pure functions of tensors: SNR weighting, noise variants, robust losses.

Nothing here holds a model, a device or a step counter. Randomness comes from the caller's
per-sample generators (one `torch.Generator` per training sample, see training/step.py): each
function draws sample i's values from generators[i] only, in sample order, so the draws of a
sample do not depend on its batch or rank. A training step draws, per sample and in this
order: its timestep, its noise, then (only when switched on) its offset noise and its input
perturbation — so runs with every option off draw exactly what they drew before.
"""

import math

import torch

from minidream.config import HUBER_SCHEDULES, LOSSES

WEIGHTED_PREDICTIONS = ("epsilon", "v_prediction")


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at per-sample timesteps t: shape [B], fp32.

    (Kingma et al. 2021, "Variational Diffusion Models", eq. 2.) 0 where alpha_bar is 0
    (the last step of a zero-terminal-SNR schedule); infinite where alpha_bar is 1.
    """
    alpha_bar = alphas_cumprod.float()[t.to(alphas_cumprod.device)]
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", sec. 3.4) for the MSE on the UNet's own target, per sample: shape of snr_t.

    The paper weights the x0-space loss by min(SNR, gamma). Written in the target's space:
      epsilon:      ||eps - eps^||^2 = SNR ||x0 - x0^||^2        -> w = min(SNR, gamma) / SNR
      v_prediction: ||v - v^||^2 = (SNR + 1) ||x0 - x0^||^2      -> w = min(SNR, gamma) / (SNR + 1)
    (x0^ = sqrt(a) x_t - sqrt(1 - a) v^ gives x0 - x0^ = sqrt(1 - a) (v^ - v), and 1 / (1 - a) = SNR + 1.)
    The epsilon weight is computed as min(1, gamma / SNR), its limit 1 at SNR = 0 (zero terminal SNR).
    """
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be > 0, got {gamma}")
    if prediction_type == "epsilon":
        return (gamma / snr_t).clamp(max=1.0)
    if prediction_type == "v_prediction":
        return snr_t.clamp(max=gamma) / (snr_t + 1)
    raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of {', '.join(WEIGHTED_PREDICTIONS)}")


def sample_timesteps(generators: list[torch.Generator], min_timestep: int, max_timestep: int) -> torch.Tensor:
    """One timestep per sample, uniform in [min_timestep, max_timestep), from its own generator: [B] int64.

    With (0, num_train_timesteps) this is the usual DDPM draw (Ho et al. Algorithm 1, line 3).
    """
    if not 0 <= min_timestep < max_timestep:
        raise ValueError(f"timestep range [{min_timestep}, {max_timestep}) is empty or negative; need 0 <= min_timestep < max_timestep")
    return torch.cat([torch.randint(min_timestep, max_timestep, (1,), generator=g) for g in generators])


def offset_noise(noise: torch.Tensor, generators: list[torch.Generator], offset: float) -> torch.Tensor:
    """noise + offset * z with z ~ N(0, 1) drawn per (sample, channel) and broadcast over H, W.

    Guttenberg 2023, "Diffusion with Offset Noise": a constant shift per channel lets the model
    learn to change an image's mean brightness. noise: B x C x H x W; sample i's z has shape
    1 x C x 1 x 1 and comes from generators[i]. offset = 0 returns `noise` and draws nothing.
    """
    if offset == 0:
        return noise
    shifts = torch.cat([torch.randn((1, noise.shape[1], *([1] * (noise.dim() - 2))), generator=g) for g in generators])
    return noise + offset * shifts.to(noise.dtype)


def perturbed_noise(noise: torch.Tensor, generators: list[torch.Generator], gamma: float) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in
    Diffusion Models", DDPM-IP): the noise that makes x_t is noise + gamma * z, z ~ N(0, 1) of the
    sample's shape, while the training target keeps the unperturbed `noise`.

    Returns the noise for x_t; gamma = 0 returns `noise` and draws nothing.
    """
    if gamma == 0:
        return noise
    extra = torch.cat([torch.randn((1, *noise.shape[1:]), generator=g) for g in generators])
    return noise + gamma * extra.to(noise.dtype)


def huber_c_schedule(
    schedule: str, huber_c: float, t: torch.Tensor, alphas_cumprod: torch.Tensor, num_train_timesteps: int
) -> torch.Tensor:
    """The per-sample Huber parameter c(t) of kohya sd-scripts' scheduled pseudo-Huber loss: [B] fp32.

    "constant":    c(t) = huber_c
    "exponential": c(t) = huber_c ** (t / T): 1 at t = 0 (MSE-like on clean inputs), huber_c at t = T
    "snr":         c(t) = (1 - huber_c) / (1 + sigma_t)^2 + huber_c, sigma_t = sqrt((1 - a_t) / a_t)
    (kohya's `get_huber_threshold` with huber_scale = 1; Khrapov & Popov 2024, "Improving Diffusion
    Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss".)
    """
    if huber_c <= 0:
        raise ValueError(f"huber_c must be > 0, got {huber_c}")
    if schedule == "constant":
        return torch.full(t.shape, huber_c, dtype=torch.float32, device=t.device)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) * t.float() / num_train_timesteps)
    if schedule == "snr":
        sigma = snr(alphas_cumprod, t).rsqrt()  # sqrt((1 - a) / a); infinite where a = 0, giving c = huber_c
        return ((1 - huber_c) / (1 + sigma) ** 2 + huber_c).to(t.device)
    raise ValueError(f"unknown huber schedule {schedule!r}; choose one of {', '.join(HUBER_SCHEDULES)}")


def per_sample_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss: str, huber_c: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sample's loss, the mean over all but the batch dimension, in fp32: shape [B].

    "mse":       (x - y)^2
    "huber":     pseudo-Huber 2c (sqrt((x - y)^2 + c^2) - c) (Charbonnier et al. 1997; kohya's
                 `conditional_loss` "huber"): ~ (x - y)^2 for |x - y| << c, ~ 2c |x - y| for |x - y| >> c
    "smooth_l1": torch's smooth L1 with beta = c (Girshick 2015): 0.5 (x - y)^2 / c below c, |x - y| - c/2
                 above; |x - y| as c -> 0.
                 (kohya's "smooth_l1" is a different formula, 2 (sqrt((x - y)^2 + c^2) - c).)
    huber_c: per-sample c, shape [B] (see huber_c_schedule); needed by huber and smooth_l1.
    Per-sample values let weights apply per sample before the instance/class split.
    weights: per-element weights broadcast to the loss (a loss mask, B x 1 x h x w): the mean is
    then of weights * loss over all elements.
    """
    diff = prediction.float() - target.float()
    if loss == "mse":
        elementwise = diff**2
    elif loss in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss {loss!r} needs huber_c, one value per sample")
        c = huber_c.float().reshape(-1, *([1] * (diff.dim() - 1)))  # B -> B x 1 x 1 x 1
        if loss == "huber":
            # 2c (sqrt(d^2 + c^2) - c) rewritten as 2c d^2 / (sqrt(d^2 + c^2) + c): equal, without the
            # cancellation that loses every digit in fp32 once c^2 >> d^2.
            squared = diff**2
            elementwise = 2 * c * squared / (torch.sqrt(squared + c**2) + c)
        else:
            magnitude = diff.abs()
            elementwise = torch.where(magnitude < c, 0.5 * diff**2 / c, magnitude - 0.5 * c)
    else:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if weights is not None:
        elementwise = elementwise * weights.to(elementwise.device, torch.float32)
    return elementwise.flatten(1).mean(dim=1)
