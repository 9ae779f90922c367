"""DDIM sampling loop with classifier-free guidance, minidream against diffusers.

minidream: `minidream.diffusion.sampling.denoise`, what `generate` runs between encoding the prompts
and decoding. diffusers: the real `StableDiffusionPipeline`, given the same prompt
embeddings and `output_type="latent"`, so it runs the same span. Weights are cast to --dtype
(as `sample.py` and diffusers' `torch_dtype` do); both start from the same per-image seeds,
so their final latents must agree, and the largest difference is printed as a check.
"""

import dataclasses
import sys

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from bench.common import (
    SD15_TFLOP,
    Row,
    Settings,
    command,
    compared,
    latent_scale,
    parser,
    report,
    settings_from,
    time_alternating,
)
from bench.models import unet_pair
from minidream.diffusion.sampling import denoise, image_generators
from minidream.models.pipeline import Pipeline


def prompt_embeddings(settings: Settings, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded stand-ins for the text encoder's output: (cond, uncond), each B x 77 x width."""
    cfg = settings.model_config
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (batch, cfg.text_encoder.context_length, cfg.unet.context_dim)
    cond, uncond = (torch.randn(shape, generator=generator).to(settings.device, settings.dtype) for _ in range(2))
    return cond, uncond


def main(argv: list[str] | None = None) -> list[Row]:
    argv = sys.argv[1:] if argv is None else argv
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--batch", type=int, default=1, help="images per loop")
    options.add_argument("--latent", type=int, default=64, help="latent height and width (64: 512px images)")
    options.add_argument("--steps", type=int, default=50, help="denoising steps")
    options.add_argument("--guidance", type=float, default=7.5)
    args = options.parse_args(argv)
    settings = settings_from(args)
    if settings.channels_last:
        options.error("--channels-last is for the UNet and VAE benches: the sampling loop makes its own latents")

    unet, twin = unet_pair(settings, settings.dtype)
    unet.eval()
    twin.eval()
    cfg = settings.model_config
    # denoise reads only the UNet and the schedule of the pipeline.
    pipe = Pipeline(unet=unet, vae=None, text_encoder=None, tokenizer=None, config=cfg)
    diffusers_pipe = StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=twin,
        scheduler=DDIMScheduler(**dataclasses.asdict(cfg.schedule)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    diffusers_pipe.set_progress_bar_config(disable=True)
    cond, uncond = prompt_embeddings(settings, args.batch)
    seeds = [settings.seed + i for i in range(args.batch)]
    latent_shape = (cfg.unet.in_channels, args.latent, args.latent)

    def run_minidream() -> torch.Tensor:
        return denoise(pipe, cond, uncond, image_generators(seeds), latent_shape, "ddim", args.steps, args.guidance)

    def run_diffusers() -> torch.Tensor:
        return diffusers_pipe(
            prompt_embeds=cond, negative_prompt_embeds=uncond, height=8 * args.latent, width=8 * args.latent,
            num_inference_steps=args.steps, guidance_scale=args.guidance, generator=image_generators(seeds),
            output_type="latent", return_dict=False,
        )[0]

    difference = (run_minidream().float() - run_diffusers().float()).abs().max().item()
    seconds = time_alternating({"minidream": run_minidream, "diffusers": run_diffusers}, settings)
    # Each denoising step runs the UNet forward on the doubled (uncond + cond) batch.
    tflop = SD15_TFLOP["unet_forward"] * 2 * args.batch * args.steps * latent_scale(args.latent, args.latent)
    shape = f"batch {args.batch}, latent {args.latent}x{args.latent}, {args.steps} steps"
    row = compared(f"DDIM loop, guidance {args.guidance:g}", shape, args.steps, "steps/s", tflop, seconds, settings)
    report([row], settings, command(__spec__.name, argv))
    print(f"\nFinal latents, max |minidream - diffusers| = {difference:.2e}")
    return [row]


if __name__ == "__main__":
    main()
