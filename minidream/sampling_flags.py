"""The sampling flags every command that draws images shares (sample.py, python -m minidream.evaluate).

One place for the flags, their defaults and checks, the device/dtype choice and the
A1111-style "parameters" PNG text, so that an evaluation image and a sample.py image made
with the same flags are the same image and carry the same text.
"""

import argparse
from pathlib import Path

import torch

from minidream.diffusion.samplers import SAMPLERS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--negative-prompt", default="", help="what to steer away from (default: none)")
    parser.add_argument("--batch-size", type=int, default=1, help="images denoised together (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="default: %(default)s")
    parser.add_argument("--karras", action="store_true", help="Karras sigma spacing (dpmpp-2m only)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; 1 disables it (default: %(default)s)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 ancestral (default: %(default)s)")
    parser.add_argument("--height", type=int, default=512, help="pixels, a multiple of 8 (default: %(default)s)")
    parser.add_argument("--width", type=int, default=512, help="pixels, a multiple of 8 (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")


def check_sampling_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error (exit 2, one line) for flag values that cannot work together."""
    if args.height % 8 or args.width % 8 or args.height <= 0 or args.width <= 0:
        parser.error(f"--height and --width must be positive multiples of 8, got {args.height}x{args.width}")
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.eta != 0 and args.sampler != "ddim":
        parser.error(f"--eta applies to the ddim sampler only, not {args.sampler}")
    if args.karras and args.sampler != "dpmpp-2m":
        parser.error(f"--karras applies to the dpmpp-2m sampler only, not {args.sampler}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")


def device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]


def parameters_text(args: argparse.Namespace, prompt: str, seed: int) -> str:
    """The A1111-style "parameters" PNG text: prompt, negative prompt, then the settings line."""
    sampler = f"{args.sampler}{' karras' if args.karras else ''}"
    return (
        f"{prompt}\nNegative prompt: {args.negative_prompt}\n"
        f"Steps: {args.steps}, Sampler: {sampler}, CFG scale: {args.guidance}, Seed: {seed}, "
        f"Size: {args.width}x{args.height}, Eta: {args.eta}, Model: {Path(args.weights).name}"
    )
