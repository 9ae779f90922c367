"""Text to image: encode prompts, denoise with classifier-free guidance, decode.

Seed rule (docs/sampling.md, "Same seed, same image"): image i owns
`torch.Generator("cpu").manual_seed(seed + i)` and draws from it, in order, its initial latents
and then the noise of every stochastic step, each of shape (1, 4, H/8, W/8). diffusers does the
same when given one generator per image, so the two agree image for image, and any image can be
reproduced alone.

SDXL (Podell et al. 2023) conditions the UNet on two text encoders' states side by side and on a
vector y: bigG's pooled projection and the micro-conditioning (sec. 2.2: the image's original
size, crop and target size). Both are doubled under guidance, the negative half first, as in
diffusers' StableDiffusionXLPipeline, whose defaults this module follows.
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from minidream.config import PIXELS_PER_LATENT, ModelConfig, check_image_size
from minidream.diffusion.guidance import guided_prediction
from minidream.diffusion.samplers import make_sampler
from minidream.models.pipeline import Pipeline
from minidream.models.unet import size_conditioning


class Conditioning(NamedTuple):
    """What prompts condition the UNet on: the text states it attends to (B x 77 x width) and,
    for SDXL, bigG's pooled projection (B x 1280; None for SD 1.x and 2.x)."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None


class SizeConditioning(NamedTuple):
    """SDXL's micro-conditioning, each pair (height, width) in pixels (Podell et al. 2023, sec. 2.2):
    the size the image had before it was resized for training, the top-left corner of the crop
    taken from it, and the size generated. None: the generated image's size; with crop (0, 0)
    these are diffusers' defaults (an uncropped image at its own size)."""

    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None

    def ids(self, height: int, width: int) -> list[int]:
        """The six ids of an image of height x width, in sgm's and diffusers' order: original
        height, width, crop top, left, target height, width."""
        image = (height, width)
        return [*(self.original_size or image), *self.crop_top_left, *(self.target_size or image)]


class FamilyDefaults(NamedTuple):
    size: int  # pixels per side
    guidance: float


def family_defaults(config: ModelConfig) -> FamilyDefaults:
    """The image side and guidance scale of diffusers' pipeline for the model's family: SDXL's
    1024 and 5.0 (StableDiffusionXLPipeline), else SD 1.5's 512 and 7.5, which minidream keeps
    for SD 2.x too. Both take 50 steps."""
    return FamilyDefaults(1024, 5.0) if config.is_sdxl else FamilyDefaults(512, 7.5)


@torch.no_grad()
def encode_prompts(pipe: Pipeline, prompts: Sequence[str], clip_skip: int | None = None) -> Conditioning:
    """B prompts -> their Conditioning, in the pipeline's device and dtype.

    SDXL: CLIP ViT-L's and bigG's penultimate states, neither layer-normed, concatenated (768 +
    1280 = 2048 wide), and bigG's pooled projection: sgm's GeneralConditioner, diffusers' encode_prompt.
    clip_skip (None: the model's setting): SD 1.x conditions on CLIP's layer -clip_skip (2 = the
    penultimate, as UIs count); SD 2.x and SDXL count from their own penultimate layer (1 = it,
    2 = one earlier, which is diffusers' SDXL clip_skip=1). The pooled vector always comes from
    bigG's last layer, as in sgm and diffusers.
    """
    ids = [tokenizer(list(prompts)).to(pipe.device) for tokenizer in pipe.tokenizers]
    return Conditioning(*(part.to(pipe.dtype) if part is not None else None
                          for part in text_conditioning(pipe.text_encoders, ids, clip_skip)))


def text_conditioning(text_encoders: Sequence[nn.Module], ids: Sequence[torch.Tensor], clip_skip: int | None) -> Conditioning:
    """The Conditioning of token ids, one tensor per text encoder (in their dtype; autograd on: the
    training loop calls it too, through DDP or FSDP wrappers of the encoders)."""
    if len(text_encoders) == 1:
        return Conditioning(text_encoders[0](ids[0], clip_skip=clip_skip))
    # CLIP-L counts its layers from the last (its SDXL config's clip_skip 2 is the penultimate),
    # bigG from the penultimate: the same user setting is one more for CLIP-L.
    states_1 = text_encoders[0](ids[0], clip_skip=None if clip_skip is None else clip_skip + 1)
    states_2, pooled = text_encoders[1](ids[1], clip_skip=clip_skip, pooled=True)
    return Conditioning(torch.cat([states_1, states_2], dim=-1), pooled)


def clip_skip_limit(config: ModelConfig) -> int:
    """The largest clip_skip `encode_prompts` takes for this model: the layers its text encoders
    can count back through (SDXL: CLIP-L's, one used up by its penultimate start, and bigG's)."""
    if config.text_encoder_2 is None:
        return config.text_encoder.conditioning_layers
    return min(config.text_encoder.conditioning_layers - 1, config.text_encoder_2.conditioning_layers)


def negative_conditioning(
    pipe: Pipeline, negative_prompts: Sequence[str] | None, cond: Conditioning, clip_skip: int | None
) -> Conditioning:
    """The guidance's unconditional half. Without negative prompts, SDXL conditions on zeros, the
    states and the pooled vector alike (diffusers' force_zeros_for_empty_prompt, set in SDXL
    base: its training dropped captions by zeroing the embeddings, sgm's GeneralConditioner),
    SD 1.x and 2.x on the empty prompt. Negative prompts given, "" included, are encoded."""
    if negative_prompts is not None:
        return encode_prompts(pipe, negative_prompts, clip_skip)
    if pipe.config.is_sdxl:
        return Conditioning(*(torch.zeros_like(part) for part in cond))
    return encode_prompts(pipe, [""] * len(cond.context), clip_skip)


def unet_arguments(
    pipe: Pipeline, conditioning: Conditioning, sizes: SizeConditioning, latent_shape: tuple[int, int, int]
) -> tuple[torch.Tensor, ...]:
    """The UNet's arguments after x and t: (context,), or for SDXL (context, y), y the pooled
    vector beside the Fourier features of the six size ids (the same for every image)."""
    if conditioning.pooled is None:
        return (conditioning.context,)
    height, width = (PIXELS_PER_LATENT * side for side in latent_shape[1:])
    ids = torch.tensor(sizes.ids(height, width), dtype=torch.float32, device=conditioning.pooled.device)
    return unet_conditioning(conditioning, ids.expand(conditioning.pooled.shape[0], -1), pipe.config.unet.size_embed_dim)


def unet_conditioning(conditioning: Conditioning, size_ids: torch.Tensor | None, size_embed_dim: int | None) -> tuple[torch.Tensor, ...]:
    """(context,), or for SDXL (context, y): y is the pooled vector beside the Fourier features
    of each image's six size ids (B x 6, `SizeConditioning.ids`' order)."""
    if conditioning.pooled is None:
        return (conditioning.context,)
    return conditioning.context, size_conditioning(conditioning.pooled, size_ids, size_embed_dim)


def image_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: CPU draws are the same on every machine and device."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def draw_noise(generators: Sequence[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """B x shape: each image's draw from its own generator, made on the CPU then moved."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators]).to(device)


@torch.no_grad()
def denoise(
    pipe: Pipeline,
    cond: Conditioning,
    uncond: Conditioning,
    generators: Sequence[torch.Generator],
    latent_shape: tuple[int, int, int],
    sampler_name: str,
    steps: int,
    guidance: float,
    eta: float = 0.0,
    karras: bool = False,
    guidance_rescale: float = 0.0,
    progress: tqdm | None = None,
    sizes: SizeConditioning = SizeConditioning(),
) -> torch.Tensor:
    """Run the sampler from pure noise to clean latents: B x 4 x h x w (unscaled by the VAE's
    scaling factor). sizes: SDXL's micro-conditioning (ignored by SD 1.x and 2.x)."""
    sampler = make_sampler(sampler_name, pipe.config.schedule, steps, eta, karras)
    cond_arguments = unet_arguments(pipe, cond, sizes, latent_shape)
    uncond_arguments = unet_arguments(pipe, uncond, sizes, latent_shape)
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
        output = guided_prediction(
            pipe.unet, model_input, t_batch, uncond_arguments, cond_arguments, guidance, guidance_rescale
        )
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
    guidance: float | None = None,
    eta: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    karras: bool = False,
    guidance_rescale: float = 0.0,
    clip_skip: int | None = None,
    sizes: SizeConditioning = SizeConditioning(),
    show_progress: bool = False,
) -> list[Image.Image]:
    """One image per (prompt, seed) pair, as PIL images.

    negative_prompts: None = no negative prompt (see `negative_conditioning`: SDXL zeros).
    guidance, height, width: None = the model family's (`family_defaults`).
    guidance_rescale: phi of guidance rescale (0 = off), as diffusers' `guidance_rescale`.
    clip_skip: see `encode_prompts` (None: the model's setting).
    sizes: SDXL's micro-conditioning (default: diffusers', from height and width).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per image")
    defaults = family_defaults(pipe.config)
    height, width = (defaults.size if side is None else side for side in (height, width))
    guidance = defaults.guidance if guidance is None else guidance
    check_image_size(width, height, f"image size {width}x{height}")
    cond = encode_prompts(pipe, prompts, clip_skip)
    uncond = negative_conditioning(pipe, negative_prompts, cond, clip_skip) if guidance != 1.0 else cond
    latent_shape = (pipe.config.unet.in_channels, height // PIXELS_PER_LATENT, width // PIXELS_PER_LATENT)
    with tqdm(total=steps, desc="denoising", disable=not show_progress, leave=False) as bar:
        latents = denoise(
            pipe, cond, uncond, image_generators(seeds), latent_shape, sampler, steps, guidance, eta, karras,
            guidance_rescale, bar, sizes,
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
