"""The 2022 DreamBooth step's draws and noising, as train.py did them before the recipe options
(minidream/training/recipe.py): the reference that recipe.py with every option off must equal."""

import torch

from minidream.diffusion import schedule


def noise_and_timesteps(
    latent_shape: tuple[int, ...], generators: list[torch.Generator], num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's timestep and noise from its own generator: (B x latent_shape, B)."""
    timesteps, noises = [], []
    for g in generators:
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
        noises.append(torch.randn((1, *latent_shape), generator=g))
    return torch.cat(noises), torch.cat(timesteps)



def noisy_latents(
    latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise clean latents at timesteps t (Ho et al. Algorithm 1): (x_t, the UNet's target)."""
    alpha_bar = schedule.alpha_bar_at(alphas_cumprod, t, latents)
    target = schedule.training_target(latents, noise, alpha_bar, prediction_type)
    return schedule.add_noise(latents, noise, alpha_bar), target
