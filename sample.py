"""Text to image with any supported Stable Diffusion 1.x checkpoint.

    python sample.py --weights weights/v1-5-pruned-emaonly.safetensors --prompt "a photo of an astronaut"
    python sample.py --weights runs/tiny --prompt "a photo of sks toy" --num-images 4

Image i uses seed S + i (its own CPU generator), so `--seed 7 --num-images 1` reproduces the
second image of `--seed 6 --num-images 2`. Files are named NNNNN-SEED.png and carry their
generation parameters as PNG text ("parameters", as popular UIs read it).
"""

import argparse
import sys
from pathlib import Path

import torch
from PIL import PngImagePlugin
from tqdm.auto import tqdm

from minidream.config import SAMPLERS
from minidream.diffusion.samplers import check_sampler_options, make_sampler
from minidream.diffusion.sampling import generate
from minidream.files import atomic_file
from minidream.io.weights import load_pipeline
from minidream.models.precision import DTYPES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate images from text with a Stable Diffusion 1.x checkpoint.")
    parser.add_argument("--weights", required=True, help="SD 1.x .safetensors/.ckpt file, diffusers folder, or a train.py run folder")
    parser.add_argument("--prompt", help="what to draw (or use --from-file)")
    parser.add_argument("--from-file", type=Path, help="a text file with one prompt per line; each line is one image per --num-images")
    parser.add_argument("--negative-prompt", default="", help="what to steer away from (default: none)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="images denoised together (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="default: %(default)s")
    parser.add_argument("--karras", action="store_true", help="Karras sigma spacing (dpmpp-2m only)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale; 1 disables it (default: %(default)s)")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                        help="guidance rescale phi in [0, 1] (Lin et al. 2024; 0.7 for zero-terminal-SNR models; default: off)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 ancestral (default: %(default)s)")
    parser.add_argument("--clip-skip", type=int, default=None, metavar="N",
                        help="condition on text-encoder layer -N: 2 = penultimate, as SD UIs count (default: the model's, 1)")
    parser.add_argument("--height", type=int, default=512, help="pixels, a multiple of 8 (default: %(default)s)")
    parser.add_argument("--width", type=int, default=512, help="pixels, a multiple of 8 (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet: slow first image, faster after (GPU)")
    parser.add_argument("--out", type=Path, default=Path("samples"), help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.from_file is None):
        parser.error("give exactly one of --prompt or --from-file")
    if args.height % 8 or args.width % 8 or args.height <= 0 or args.width <= 0:
        parser.error(f"--height and --width must be positive multiples of 8, got {args.height}x{args.width}")
    for name in ("num_images", "batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        check_sampler_options(args.sampler, args.eta, args.karras)
    except ValueError as error:
        parser.error(str(error))
    if not 0 <= args.guidance_rescale <= 1:
        parser.error(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    if args.clip_skip is not None and args.clip_skip < 1:
        parser.error(f"--clip-skip must be at least 1, got {args.clip_skip}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU")
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The --prompt, or the non-blank lines of --from-file; ValueError if there are none."""
    if args.prompt is not None:
        return [args.prompt]
    if not args.from_file.is_file():
        raise ValueError(f"--from-file {args.from_file}: no such file")
    prompts = [line.strip() for line in args.from_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--from-file {args.from_file} holds no prompts")
    return prompts


def parameters_text(args: argparse.Namespace, prompt: str, seed: int) -> str:
    """The A1111-style "parameters" PNG text: prompt, negative prompt, then the settings line."""
    sampler = f"{args.sampler}{' karras' if args.karras else ''}"
    extras = (f", CFG Rescale phi: {args.guidance_rescale}" if args.guidance_rescale else "") + (
        f", Clip skip: {args.clip_skip}" if args.clip_skip else ""
    )
    return (
        f"{prompt}\nNegative prompt: {args.negative_prompt}\n"
        f"Steps: {args.steps}, Sampler: {sampler}, CFG scale: {args.guidance}, Seed: {seed}, "
        f"Size: {args.width}x{args.height}, Eta: {args.eta}{extras}, Model: {Path(args.weights).name}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    try:
        prompts = read_prompts(args)
        pipe = load_pipeline(args.weights, device=device, dtype=dtype)
        # What the checkpoint cannot take (more steps than it was trained with, a clip skip deeper
        # than its text encoder) is refused here, before any image, not as a traceback from the first.
        make_sampler(args.sampler, pipe.config.schedule, args.steps, args.eta, args.karras)
        if args.clip_skip is not None and args.clip_skip > pipe.config.text_encoder.layers:
            raise ValueError(f"--clip-skip {args.clip_skip}: the text encoder has {pipe.config.text_encoder.layers} layers")
    except ValueError as error:  # WeightsError is a ValueError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.compile:
        pipe.unet.compile(fullgraph=True)
    jobs = [(p, args.seed + i) for p in prompts for i in range(args.num_images)]
    args.out.mkdir(parents=True, exist_ok=True)
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="images", unit="batch"):
        batch = jobs[start : start + args.batch_size]
        images = generate(
            pipe, [p for p, _ in batch], [s for _, s in batch], negative_prompts=[args.negative_prompt] * len(batch),
            steps=args.steps, sampler=args.sampler, guidance=args.guidance, eta=args.eta,
            height=args.height, width=args.width, karras=args.karras, guidance_rescale=args.guidance_rescale,
            clip_skip=args.clip_skip, show_progress=True,
        )
        for offset, ((prompt, seed), image) in enumerate(zip(batch, images)):
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", parameters_text(args, prompt, seed))
            with atomic_file(args.out / f"{start + offset:05d}-{seed}.png") as tmp:
                image.save(tmp, format="PNG", pnginfo=info)
    print(f"wrote {len(jobs)} image(s) to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
