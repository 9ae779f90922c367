"""Sampling loop with classifier-free guidance (any sampler, DDIM by default), minidream against diffusers.

minidream: `minidream.diffusion.sampling.denoise`, what `generate` runs between encoding the prompts
and decoding. diffusers: the real `StableDiffusionPipeline` (SDXL: `StableDiffusionXLPipeline`,
also given the pooled vectors; the size ids are both sides' defaults) with the sampler's diffusers
scheduler (`--sampler`, `--karras`; bench/schedulers.py), given the same prompt embeddings and
`output_type="latent"`, so it runs the same span. The rows count UNet calls per image (Heun makes
2N - 1 for N steps, PLMS N + 1), each a forward on the doubled (uncond + cond) batch. Weights are cast to --dtype
(as `sample.py` and diffusers' `torch_dtype` do); both start from the same per-image seeds,
so their final latents must agree, and the largest difference is printed as a check.
"""

import sys
from collections.abc import Callable

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.schedulers import scheduling_lms_discrete

from bench.common import (
    Row,
    Settings,
    command,
    compared,
    parser,
    report,
    settings_from,
    time_alternating,
)
from bench.models import unet_pair, unet_tflop
from bench.schedulers import GaussLegendre20, lms_integrator_missing, scheduler_from_config
from minidream.config import SAMPLERS
from minidream.diffusion.samplers import KARRAS_SAMPLERS, make_sampler
from minidream.diffusion.sampling import Conditioning, denoise, image_generators
from minidream.io.diffusers_folder import schedule_config_to_diffusers
from minidream.sampling_flags import A1111_NAMES
from minidream.models.pipeline import Pipeline


def prompt_embeddings(settings: Settings, batch: int) -> tuple[Conditioning, Conditioning]:
    """Seeded stand-ins for the text encoders' output, (cond, uncond): each B x 77 x width and,
    for SDXL, a pooled vector B x 1280."""
    cfg = settings.model_config
    generator = torch.Generator().manual_seed(settings.seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(settings.device, settings.dtype)

    def conditioning() -> Conditioning:
        context = draw(batch, cfg.text_encoder.context_length, cfg.unet.context_dim)
        return Conditioning(context, None if cfg.text_encoder_2 is None else draw(batch, cfg.text_encoder_2.width))

    return conditioning(), conditioning()


def diffusers_pipeline(settings: Settings, twin, sampler: str, karras: bool) -> DiffusionPipeline:
    """diffusers' pipeline of the model family around the UNet twin, with the sampler's scheduler
    made from the same schedule config."""
    cfg = settings.model_config
    scheduler = scheduler_from_config(schedule_config_to_diffusers(cfg.schedule), sampler, karras)
    if cfg.text_encoder_2 is None:
        pipe = StableDiffusionPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=twin, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionXLPipeline(
            vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None, unet=twin,
            scheduler=scheduler, add_watermarker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampling_runs(
    settings: Settings, unet, twin, batch: int, latent: int, steps: int, guidance: float, sampler: str = "ddim",
    karras: bool = False,
) -> dict[str, Callable[[], torch.Tensor]]:
    """One whole sampling loop of each implementation, from the same seeds: each returns its final latents."""
    cfg = settings.model_config
    # denoise reads only the UNet and the schedule of the pipeline.
    pipe = Pipeline(unet=unet, vae=None, text_encoder=None, tokenizer=None, config=cfg)
    diffusers_pipe = diffusers_pipeline(settings, twin, sampler, karras)
    cond, uncond = prompt_embeddings(settings, batch)
    # SDXL's pooled vectors, by diffusers' names (none for SD 1.x and 2.x)
    pooled = {} if cond.pooled is None else {
        "pooled_prompt_embeds": cond.pooled, "negative_pooled_prompt_embeds": uncond.pooled
    }
    seeds = [settings.seed + i for i in range(batch)]
    latent_shape = (cfg.unet.in_channels, latent, latent)

    def run_minidream() -> torch.Tensor:
        return denoise(pipe, cond, uncond, image_generators(seeds), latent_shape, sampler, steps, guidance, karras=karras)

    def run_diffusers() -> torch.Tensor:
        return diffusers_pipe(
            prompt_embeds=cond.context, negative_prompt_embeds=uncond.context, **pooled, height=8 * latent,
            width=8 * latent, num_inference_steps=steps, guidance_scale=guidance, generator=image_generators(seeds),
            output_type="latent", return_dict=False,
        )[0]

    return {"minidream": run_minidream, "diffusers": run_diffusers}


def largest_difference(runs: dict[str, Callable[[], torch.Tensor]]) -> float:
    """max |minidream - diffusers| over the final latents: the same weights and seeds must agree."""
    return (runs["minidream"]().float() - runs["diffusers"]().float()).abs().max().item()


def sampling_row(
    batch: int, latent: int, steps: int, guidance: float, seconds: dict[str, float], settings: Settings,
    sampler: str = "ddim", karras: bool = False,
) -> Row:
    # Each UNet call runs the forward on the doubled (uncond + cond) batch.
    calls = len(make_sampler(sampler, settings.model_config.schedule, steps, karras=karras).timesteps)
    tflop = unet_tflop(settings, 2 * batch, latent, backward=False) * calls
    shape = f"batch {batch}, latent {latent}x{latent}, {steps} steps = {calls} UNet calls"
    name = f"{A1111_NAMES[sampler]}{' Karras' if karras else ''} loop, guidance {guidance:g}"  # "DDIM loop", "Heun Karras loop"
    return compared(name, shape, steps, "steps/s", tflop, seconds)


def main(argv: list[str] | None = None) -> list[Row]:
    argv = sys.argv[1:] if argv is None else argv
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--batch", type=int, default=1, help="images per loop")
    options.add_argument("--latent", type=int, default=64, help="latent height and width (64: 512px images)")
    options.add_argument("--steps", type=int, default=50, help="denoising steps")
    options.add_argument("--guidance", type=float, default=7.5)
    options.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="the sampler (sample.py's names)")
    options.add_argument("--karras", action="store_true", help=f"Karras sigmas ({', '.join(KARRAS_SAMPLERS)})")
    args = options.parse_args(argv)
    settings = settings_from(args)
    if settings.channels_last:
        options.error("--channels-last is for the UNet and VAE benches: the sampling loop makes its own latents")

    if args.karras and args.sampler not in KARRAS_SAMPLERS:
        options.error(f"--karras applies to {', '.join(KARRAS_SAMPLERS)}, not {args.sampler}")
    if args.sampler == "lms" and lms_integrator_missing():  # diffusers' LMS weights need an integrator
        scheduling_lms_discrete.integrate = GaussLegendre20

    unet, twin = unet_pair(settings, settings.dtype)
    runs = sampling_runs(
        settings, unet, twin, args.batch, args.latent, args.steps, args.guidance, args.sampler, args.karras
    )
    difference = largest_difference(runs)
    seconds = time_alternating(runs, settings)
    row = sampling_row(args.batch, args.latent, args.steps, args.guidance, seconds, settings, args.sampler, args.karras)
    report([row], settings, command(__spec__.name, argv))
    print(f"\nFinal latents, max |minidream - diffusers| = {difference:.2e}")
    return [row]


if __name__ == "__main__":
    main()
