"""The training recipe of one step, composed from diffusion/loss_weighting.py: what train.py calls.

    recipe = Recipe.from_config(cfg.train, pipe.config.schedule)
    noise, input_noise, t = draw_noise(latents.shape[1:], generators, recipe, device)
    noisy, target = noisy_latents_and_target(latents, noise, input_noise, t, alphas_cumprod, recipe)
    losses = recipe_loss(prediction, target, t, alphas_cumprod, recipe, n_instance, prior_loss_weight)

With every option off, the draws and the loss are exactly those of the plain 2022 recipe
(Ho et al. Algorithm 1 with uniform timesteps, Ruiz et al. eq. 2; tests/plain_recipe.py holds it).
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch

from minidream.config import ScheduleConfig, TrainSection
from minidream.diffusion import loss_weighting, schedule
from minidream.training.step import to_device


@dataclass(frozen=True)
class Recipe:
    """The train.* recipe keys, with max_timestep resolved and the schedule's prediction type."""

    prediction_type: str
    min_timestep: int
    max_timestep: int
    num_train_timesteps: int
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    snr_gamma: float | None = None
    loss: str = "mse"
    huber_c: float = 0.1
    huber_schedule: str = "snr"

    @classmethod
    def from_config(cls, train: TrainSection, sched: ScheduleConfig) -> "Recipe":
        return cls(
            prediction_type=sched.prediction_type,
            min_timestep=train.min_timestep,
            max_timestep=sched.num_train_timesteps if train.max_timestep is None else train.max_timestep,
            num_train_timesteps=sched.num_train_timesteps,
            noise_offset=train.noise_offset,
            input_perturbation=train.input_perturbation,
            snr_gamma=train.snr_gamma,
            loss=train.loss,
            huber_c=train.huber_c,
            huber_schedule=train.huber_schedule,
        )


def draw_noise(
    latent_shape: tuple[int, ...], generators: list[torch.Generator], recipe: Recipe, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each sample's draws from its own generator (on the host), in the order timestep, noise,
    offset, perturbation; then copied to `device` without a host wait (step.to_device).

    Returns (noise: the target's noise, B x latent_shape; input_noise: the noise that makes x_t,
    the same tensor unless input perturbation is on; t: B timesteps).
    """
    t = loss_weighting.sample_timesteps(generators, recipe.min_timestep, recipe.max_timestep)
    noise = torch.cat([torch.randn((1, *latent_shape), generator=g) for g in generators])
    noise = loss_weighting.offset_noise(noise, generators, recipe.noise_offset)
    input_noise = loss_weighting.perturbed_noise(noise, generators, recipe.input_perturbation)
    perturbed = input_noise is not noise
    noise, t = to_device(noise, device), to_device(t, device)
    return noise, to_device(input_noise, device) if perturbed else noise, t


def noisy_latents_and_target(
    latents: torch.Tensor, noise: torch.Tensor, input_noise: torch.Tensor, t: torch.Tensor,
    alphas_cumprod: torch.Tensor, recipe: Recipe,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t from `input_noise` (Ho et al. eq. 4) and the UNet's target from `noise` (Ning et al. 2023)."""
    alpha_bar = schedule.alpha_bar_at(alphas_cumprod, t, latents)
    target = schedule.training_target(latents, noise, alpha_bar, recipe.prediction_type)
    return schedule.add_noise(latents, input_noise, alpha_bar), target


def sample_losses(
    prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, recipe: Recipe,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each sample's loss [B]: the recipe's loss, weighted per element by `mask` (B x 1 x h x w,
    data.masks: the mean of mask * loss) and then per sample (min-SNR-gamma). fp32; no host reads."""
    huber_c = None
    if recipe.loss != "mse":
        huber_c = loss_weighting.huber_c_schedule(recipe.huber_schedule, recipe.huber_c, t, alphas_cumprod, recipe.num_train_timesteps)
    per_sample = loss_weighting.per_sample_loss(prediction, target, recipe.loss, huber_c, weights=mask)
    if recipe.snr_gamma is not None:
        snr_t = loss_weighting.snr(alphas_cumprod, t)
        per_sample = per_sample * loss_weighting.min_snr_weights(snr_t, recipe.snr_gamma, recipe.prediction_type).to(per_sample.device)
    return per_sample


class Losses(NamedTuple):
    total: torch.Tensor  # what backward differentiates
    instance: torch.Tensor  # the mean over the instance samples
    prior: torch.Tensor  # the mean over the class samples (0 without them)
    per_sample: torch.Tensor  # [num_instance] each instance sample's loss, detached: the per-subject sums


def recipe_loss(
    prediction: torch.Tensor, target: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, recipe: Recipe,
    num_instance: int, prior_loss_weight: float, mask: torch.Tensor | None = None,
) -> Losses:
    """The DreamBooth loss (Ruiz et al. 2023 eq. 2): the instance samples' mean loss + prior_loss_weight
    x the class samples' mean loss. The batch holds the instance samples first, then (with prior
    preservation) their class samples, so one forward serves both.

    The plain recipe (MSE, no mask, no min-SNR) averages over every element, as eq. 2 is written.
    Otherwise each sample's loss is weighted first (the loss mask, min-SNR-gamma: sample_losses)
    and the samples are averaged. fp32; no host reads.
    """
    if recipe.loss == "mse" and recipe.snr_gamma is None and mask is None:
        errors = (prediction.float() - target.float()) ** 2
        instance, prior = errors[:num_instance].mean(), errors[num_instance:]
        per_sample = errors[:num_instance].detach().flatten(1).mean(dim=1)
    else:
        losses = sample_losses(prediction, target, t, alphas_cumprod, recipe, mask)
        instance, prior = losses[:num_instance].mean(), losses[num_instance:]
        per_sample = losses[:num_instance].detach()
    if prior.shape[0] == 0:
        return Losses(instance, instance, torch.zeros((), device=instance.device), per_sample)
    prior = prior.mean()
    return Losses(instance + prior_loss_weight * prior, instance, prior, per_sample)
