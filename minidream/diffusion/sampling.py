"""Text to image: encode prompts, denoise with classifier-free guidance, decode.

Seed rule (docs/sampling.md, "Same seed, same image"): image i owns
`torch.Generator("cpu").manual_seed(seed + i)` and draws from it, in order, its initial latents
and then the noise of every stochastic step, each of shape (1, 4, H/8, W/8). diffusers does the
same when given one generator per image, so the two agree image for image, and any image can be
reproduced alone.
"""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from minidream.config import image_size_multiple
from minidream.diffusion.guidance import guided_prediction
from minidream.diffusion.samplers import make_sampler
from minidream.models.pipeline import Pipeline


@torch.no_grad()
def encode_prompts(pipe: Pipeline, prompts: Sequence[str], clip_skip: int | None = None) -> torch.Tensor:
    """B prompts -> B x 77 x width text-encoder states, in the pipeline's device and dtype.
    clip_skip: 2 reads the penultimate layer (None: the text encoder's config)."""
    ids = pipe.tokenizer(list(prompts)).to(pipe.device)
    return pipe.text_encoder(ids, clip_skip=clip_skip).to(pipe.dtype)


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: CPU draws are the same on every machine and device."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def draw_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """B x shape: each image's draw from its own generator, made on the CPU then moved."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators]).to(device)


@torch.no_grad()
def denoise(
    pipe: Pipeline,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    generators: Sequence[torch.Generator],
    latent_shape: tuple[int, int, int],
    sampler_name: str,
    steps: int,
    guidance: float,
    eta: float = 0.0,
    karras: bool = False,
    guidance_rescale: float = 0.0,
    progress: tqdm | None = None,
) -> torch.Tensor:
    """Run the sampler from pure noise to clean latents: B x 4 x h x w (unscaled by 0.18215)."""
    sampler = make_sampler(sampler_name, pipe.config.schedule, steps, eta, karras)
    if progress is not None:  # one tick per UNet call: Heun makes 2N - 1, PLMS N + 1
        progress.reset(total=len(sampler.timesteps))
    # Every draw is made up front, in the order the seed rule fixes (initial latents, then each
    # stochastic step's noise), and the timesteps are moved once: the loop itself never waits
    # on a host-to-device copy.
    latents = draw_noise(generators, latent_shape, pipe.dtype, pipe.device) * sampler.init_noise_sigma
    noise_dtype = getattr(sampler, "noise_dtype", pipe.dtype)  # diffusers' SDE solver draws in float32
    steps_noise = [
        draw_noise(generators, latent_shape, noise_dtype, pipe.device) if sampler.draws_noise(i) else None
        for i in range(len(sampler.timesteps))
    ]
    timesteps = sampler.timesteps.to(pipe.device)
    state = None
    for i, noise in enumerate(steps_noise):
        model_input = sampler.scale_model_input(latents, i)
        t_batch = timesteps[i].expand(latents.shape[0])
        output = guided_prediction(pipe.unet, model_input, t_batch, uncond, cond, guidance, guidance_rescale)
        latents, state = sampler.step(latents, output, i, state, noise)
        if progress is not None:
            progress.update(1)
    return latents


@torch.no_grad()
def decode_latents(pipe: Pipeline, latents: torch.Tensor) -> np.ndarray:
    """Latents -> B x H x W x 3 uint8 images (rounded, as diffusers' image processor does).

    The VAE runs in its own dtype (models.precision.vae_dtype: fp32 beside fp16 models) even
    inside an fp16 autocast region, which would otherwise run its convolutions in fp16 and
    overflow the decoder: the black or NaN images of fp16 pipelines."""
    vae_dtype = next(pipe.vae.parameters()).dtype
    with torch.autocast(latents.device.type, enabled=False):
        images = pipe.vae.decode(latents.to(vae_dtype) / pipe.config.vae.scaling_factor)
    images = (images.float() / 2 + 0.5).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def generate(
    pipe: Pipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    negative_prompts: Sequence[str] | None = None,
    steps: int = 50,
    sampler: str = "ddim",
    guidance: float = 7.5,
    eta: float = 0.0,
    height: int = 512,
    width: int = 512,
    karras: bool = False,
    guidance_rescale: float = 0.0,
    clip_skip: int | None = None,
    show_progress: bool = False,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, as PIL images.

    guidance_rescale: phi of guidance rescale (0 = off), as diffusers' `guidance_rescale`.
    clip_skip: 2 conditions on the penultimate text-encoder layer (None: the model's setting).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per image")
    multiple = image_size_multiple(len(pipe.config.vae.channel_mult), len(pipe.config.unet.channel_mult))
    if height % multiple or width % multiple:
        raise ValueError(f"this model needs height and width that are multiples of {multiple}, got {height}x{width}")
    negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
    cond = encode_prompts(pipe, prompts, clip_skip)
    uncond = encode_prompts(pipe, negative_prompts, clip_skip) if guidance != 1.0 else cond
    latent_shape = (pipe.config.unet.in_channels, height // 8, width // 8)
    with tqdm(total=steps, desc="denoising", disable=not show_progress, leave=False) as bar:
        latents = denoise(
            pipe, cond, uncond, image_generators(seeds), latent_shape, sampler, steps, guidance, eta, karras,
            guidance_rescale, bar,
        )
    return [Image.fromarray(image) for image in decode_latents(pipe, latents)]


def image_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images row by row into one picture."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid
