"""The sampling flags every command that draws images shares (sample.py, python -m minidream.evaluate).

One place for the flags, their defaults and checks, the device/dtype choice, the call into
`generate` and the A1111-style "parameters" PNG text, so that an evaluation image and a
sample.py image made with the same flags are the same image and carry the same text.
"""

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from minidream.config import PREDICTION_TYPES, SAMPLERS, TIMESTEP_SPACINGS, ModelConfig, check_image_size
from minidream.diffusion.samplers import KARRAS_SAMPLERS, check_sampler_options, make_sampler
from minidream.diffusion.sampling import SizeConditioning, clip_skip_limit, family_defaults, generate
from minidream.io.lora_files import lora_argument, lora_hash
from minidream.models.pipeline import Pipeline
from minidream.models.precision import DTYPES


# When to use each sampler (sample.py --help) and the name A1111 shows for it in the PNG text.
SAMPLER_USES = {
    "ddim": "25-50 steps, deterministic at --eta 0, the DreamBooth paper's",
    "ddpm": "hundreds of steps, the training chain's own ancestral sampler",
    "euler-a": "20-30 steps, Euler ancestral, varied soft images, changes rather than converges with more steps",
    "dpmpp-2m": "15-25 steps, the usual fast choice, best with --karras",
    "euler": "25-50 steps, plain deterministic Euler ODE steps",
    "heun": "15-30 steps, second-order Euler, 2 UNet calls a step (slower, more accurate per step)",
    "plms": "30-50 steps, the original DreamBooth repository's PLMS (one extra UNet call)",
    "lms": "30-50 steps, 4th-order linear multistep, sharp with --karras, unstable at few steps",
    "dpmpp-2m-sde": "20-30 steps, DPM++ 2M with fresh noise each step from the image's seed, more detail",
    "unipc": "10-20 steps, UniPC predictor-corrector, good at very few steps",
}
A1111_NAMES = {
    "ddim": "DDIM", "ddpm": "DDPM", "euler-a": "Euler a", "dpmpp-2m": "DPM++ 2M", "euler": "Euler", "heun": "Heun",
    "plms": "PLMS", "lms": "LMS", "dpmpp-2m-sde": "DPM++ 2M SDE", "unipc": "UniPC",
}  # fmt: skip
SIZE_FLAGS = ("original_size", "crop_top_left", "target_size")  # SDXL's micro-conditioning, as args names them


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--negative-prompt", default=None,
                        help='what to steer away from (default: none, which SDXL models take as zero embeddings, '
                        'as diffusers does, and SD 1.x/2.x as the empty prompt); an explicit --negative-prompt "" '
                        "is encoded like any prompt, as diffusers and ComfyUI do (A1111 zeroes it instead)")
    parser.add_argument("--batch-size", type=int, default=1, help="images denoised together (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s, diffusers' for every family)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim",
                        help=" | ".join(f"{name}: {use}" for name, use in SAMPLER_USES.items()) + " (default: %(default)s)")
    parser.add_argument("--karras", action="store_true",
                        help=f"Karras sigma spacing, often better at few steps ({', '.join(KARRAS_SAMPLERS)})")
    parser.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=None,
                        help="which of the training timesteps the steps visit (Lin et al. 2024, table 2): 'trailing' "
                        "reaches the last one, as zero-terminal-SNR models need (default: the model's scheduler "
                        "config, else the sampler's diffusers default: leading for ddim, ddpm and plms, linspace "
                        "for the others)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale; 1 disables it (default: 7.5 for SD 1.x/2.x, 5.0 for SDXL)")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                        help="guidance rescale phi in [0, 1] (Lin et al. 2024; 0.7 for zero-terminal-SNR models; default: off)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 ancestral (default: %(default)s)")
    parser.add_argument("--clip-skip", type=int, default=None, metavar="N",
                        help="condition on an earlier text-encoder layer: SD 1.x reads layer -N (2 = penultimate, as "
                        "SD UIs count); SD 2.x and SDXL count from the penultimate layer they read (1 = it, 2 = one "
                        "earlier) (default: the model's)")
    size_rule = ("a multiple of 8, the VAE's downsampling, for every model (checked before the model loads); "
                 "default: 512 for SD 1.x/2.x, 1024 for SDXL")
    parser.add_argument("--height", type=int, default=None, help=f"pixels, {size_rule}")
    parser.add_argument("--width", type=int, default=None, help=f"pixels, {size_rule}")
    sizes = parser.add_argument_group(
        "SDXL micro-conditioning",
        "SDXL was trained told each photo's size before it was resized and where it was cropped (Podell et al. "
        "2023, sec. 2.2); sampling with other values changes the look. Defaults, as diffusers': original size = "
        "target size = the image's, crop 0 0. SD 1.x/2.x models take none of these.",
    )
    sizes.add_argument("--original-size", type=int, nargs=2, metavar=("H", "W"),
                       help="the size the model is told the image had: smaller looks blurrier, as an upscaled photo")
    sizes.add_argument("--crop-top-left", type=int, nargs=2, metavar=("TOP", "LEFT"),
                       help="the crop's top-left corner in the original: nonzero values draw subjects cut off at the edges")
    sizes.add_argument("--target-size", type=int, nargs=2, metavar=("H", "W"), help="the size the model is told it makes")
    parser.add_argument("--lora", action="append", type=lora_argument, default=[], metavar="PATH[:SCALE]",
                        help="merge this LoRA file into the model at strength SCALE (default 1); repeat for several")
    parser.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                        help="what the UNet predicts, for SD 2.x single files that do not say "
                        "(768 models: v_prediction; default: the file's metadata, else ComfyUI's rule)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")


def check_sampling_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (exit 2, one line) for flag values that cannot work together. (The image size
    is checked by the commands as a ConfigError, exit 2 too: check_image_size_flags.)"""
    if any(side is not None and side <= 0 for side in (args.height, args.width)):
        given = "x".join("(default)" if side is None else str(side) for side in (args.height, args.width))
        parser.error(f"--height and --width must be positive, got {given}")
    for name in SIZE_FLAGS:
        values, lowest = getattr(args, name), 0 if name == "crop_top_left" else 1
        if values is not None and min(values) < lowest:
            parser.error(f"--{name.replace('_', '-')} {values[0]} {values[1]}: each value must be at least {lowest}")
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        check_sampler_options(args.sampler, args.eta, args.karras)
        check_clip_skip(args.clip_skip)
    except ValueError as error:
        parser.error(str(error))
    if not 0 <= args.guidance_rescale <= 1:
        parser.error(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    for path, scale in args.lora:
        if not math.isfinite(scale):
            parser.error(f"--lora {path}:{scale}: the strength must be a finite number")
        if not path.is_file():
            parser.error(f"--lora {path}: no such LoRA file (give PATH or PATH:SCALE, e.g. sks.safetensors:0.8)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")


def check_image_size_flags(args: argparse.Namespace) -> None:
    """ConfigError unless the --height and --width given are multiples of 8 (config.check_image_size),
    checked before the model loads; a side left out takes the model's default size, which fits."""
    width, height = args.width or args.height, args.height or args.width
    if width is not None:
        sides = (("width", args.width), ("height", args.height))
        given = " ".join(f"--{name} {side}" for name, side in sides if side is not None)
        check_image_size(width, height, given)


def check_flags_fit(args: argparse.Namespace, pipe: Pipeline) -> None:
    """ValueError for what the loaded checkpoint cannot take (more steps than it was trained
    with, a clip skip deeper than its text encoder, size conditioning for a model without it):
    refused before any image, not as a traceback from the first."""
    make_sampler(args.sampler, pipe.config.schedule, args.steps, args.eta, args.karras)
    check_clip_skip(args.clip_skip, clip_skip_limit(pipe.config))
    given = [name for name in SIZE_FLAGS if getattr(args, name) is not None]
    if given and not pipe.config.is_sdxl:
        raise ValueError(f"--{given[0].replace('_', '-')}: only SDXL models take size conditioning; this is SD 1.x/2.x")


def fill_model_defaults(args: argparse.Namespace, config: ModelConfig) -> None:
    """Give the size and guidance flags left out the model family's defaults (and, for SDXL, the
    size conditioning diffusers' defaults), in place: `args` then hold every setting the images
    are drawn with, as their PNG text records them."""
    defaults = family_defaults(config)
    args.height, args.width = (defaults.size if side is None else side for side in (args.height, args.width))
    args.guidance = defaults.guidance if args.guidance is None else args.guidance
    if config.is_sdxl:
        image = [args.height, args.width]
        args.original_size, args.target_size = args.original_size or image, args.target_size or image
        args.crop_top_left = args.crop_top_left or [0, 0]


def use_flag_spacing(args: argparse.Namespace, pipe: Pipeline) -> None:
    """--timestep-spacing given: the model samples with it, as diffusers' pipeline does with a
    scheduler built `from_config(config, timestep_spacing=...)`."""
    if args.timestep_spacing is not None:
        schedule = dataclasses.replace(pipe.config.schedule, timestep_spacing=args.timestep_spacing)
        pipe.config = dataclasses.replace(pipe.config, schedule=schedule)


def check_clip_skip(clip_skip: int | None, layers: int | None = None) -> None:
    """ValueError unless --clip-skip (None: the model's) is at least 1 and, once the text encoder
    is known, at most its `layers` (sampling.clip_skip_limit)."""
    if clip_skip is not None and clip_skip < 1:
        raise ValueError(f"--clip-skip must be at least 1, got {clip_skip}")
    if clip_skip is not None and layers is not None and clip_skip > layers:
        raise ValueError(f"--clip-skip {clip_skip}: the text encoder has {layers} layers")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]


@dataclass(frozen=True)
class Sampling:
    """How images are drawn: the sampling flags, as `generate` takes them (None: the model family's
    size and guidance; no negative prompt)."""

    steps: int = 50
    sampler: str = "ddim"
    guidance: float | None = None
    eta: float = 0.0
    karras: bool = False
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    batch_size: int = 4
    guidance_rescale: float = 0.0
    clip_skip: int | None = None
    sizes: SizeConditioning = SizeConditioning()


def sampling_of(args: argparse.Namespace) -> Sampling:
    original, target = (None if pair is None else tuple(pair) for pair in (args.original_size, args.target_size))
    sizes = SizeConditioning(original, tuple(args.crop_top_left or (0, 0)), target)
    return Sampling(
        steps=args.steps, sampler=args.sampler, guidance=args.guidance, eta=args.eta, karras=args.karras,
        height=args.height, width=args.width, negative_prompt=args.negative_prompt, batch_size=args.batch_size,
        guidance_rescale=args.guidance_rescale, clip_skip=args.clip_skip, sizes=sizes,
    )  # fmt: skip


def draw(
    pipe: Pipeline, prompts: Sequence[str], seeds: Sequence[int], sampling: Sampling, show_progress: bool = False
) -> list[Image.Image]:
    """One image per (prompt, seed), all in one batch: `generate` with the sampling settings."""
    negatives = None if sampling.negative_prompt is None else [sampling.negative_prompt] * len(prompts)
    return generate(
        pipe, list(prompts), list(seeds), negative_prompts=negatives,
        steps=sampling.steps, sampler=sampling.sampler, guidance=sampling.guidance, eta=sampling.eta,
        height=sampling.height, width=sampling.width, karras=sampling.karras,
        guidance_rescale=sampling.guidance_rescale, clip_skip=sampling.clip_skip, sizes=sampling.sizes,
        show_progress=show_progress,
    )  # fmt: skip


def lora_hashes(args: argparse.Namespace) -> dict[str, str]:
    """{LoRA name: A1111 short hash} of the --lora files, computed once for every image's text."""
    return {path.stem: lora_hash(path) for path, _ in args.lora}


def parameters_text(args: argparse.Namespace, prompt: str, seed: int, hashes: Mapping[str, str]) -> str:
    """The A1111-style "parameters" PNG text: prompt, negative prompt, then the settings line
    (`args` after fill_model_defaults, so the size and guidance are the ones drawn with).

    LoRAs as A1111 writes them: a `<lora:name:strength>` tag in the prompt (what its prompt
    parser applies when the text is pasted back) and `Lora hashes: "name: hash, ..."` in the
    settings (quoted, as A1111 quotes values holding ':' or ','); `hashes` is lora_hashes(args).
    """
    tags = "".join(f" <lora:{path.stem}:{scale:g}>" for path, scale in args.lora)
    sampler = f"{A1111_NAMES[args.sampler]}{' Karras' if args.karras else ''}"
    sdxl = args.original_size is not None  # fill_model_defaults sets it for SDXL models only
    spacing = f", Timestep spacing: {args.timestep_spacing}" if args.timestep_spacing else ""
    extras = spacing + (f", CFG Rescale phi: {args.guidance_rescale}" if args.guidance_rescale else "") + (
        f", Clip skip: {args.clip_skip}" if args.clip_skip else ""
    ) + (sdxl_settings_text(args) if sdxl else "")
    loras = ', '.join(f"{name}: {digest}" for name, digest in hashes.items())
    return (
        f"{prompt}{tags}\nNegative prompt: {args.negative_prompt or ''}\n"
        f"Steps: {args.steps}, Sampler: {sampler}, CFG scale: {args.guidance}, Seed: {seed}, "
        f"Size: {args.width}x{args.height}, Eta: {args.eta}{extras}, Model: {Path(args.weights).name}"
        + (f', Lora hashes: "{loras}"' if loras else "")
    )


def sdxl_settings_text(args: argparse.Namespace) -> str:
    """The size conditioning, in A1111's style: A1111 itself writes none (its crop is a global
    setting, sdxl_crop_top/left, "crop top/left coordinate"; its sizes are the image's), so the
    crop takes those names and the sizes are width x height like its "Size". And an explicit empty
    negative prompt, which minidream encodes where A1111 (reading "Negative prompt: " back) zeroes it."""
    (original_h, original_w), (top, left), (target_h, target_w) = args.original_size, args.crop_top_left, args.target_size
    encoded_empty = ", Empty negative prompt: encoded" if args.negative_prompt == "" else ""
    return (
        f", Original size: {original_w}x{original_h}, Crop top: {top}, Crop left: {left}, "
        f"Target size: {target_w}x{target_h}{encoded_empty}"
    )
