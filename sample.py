"""Text to image with any supported Stable Diffusion 1.x, 2.x or XL checkpoint.

    python sample.py --weights weights/v1-5-pruned-emaonly.safetensors --prompt "a photo of an astronaut"
    python sample.py --weights runs/tiny --prompt "a photo of sks toy" --num-images 4
    python sample.py --weights weights/v1-5-pruned-emaonly.safetensors --lora runs/my-dog/lora.safetensors:0.8 \\
        --prompt "a photo of sks dog on the beach"

Image i uses seed S + i (its own CPU generator), so `--seed 7 --num-images 1` reproduces the
second image of `--seed 6 --num-images 2`. Files are named NNNNN-SEED.png and carry their
generation parameters as PNG text ("parameters", as popular UIs read it; --lora files as
A1111 names them: `<lora:name:scale>` in the prompt, their short hashes in "Lora hashes").
The size and guidance left out follow the model's family (SD 1.x/2.x: 512 and 7.5; SDXL: 1024
and 5.0, with diffusers' size conditioning), and the PNG text records the values used.

Everything that can be refused without the model (flags, the prompt file, the image size the
model can take, an --out that cannot be written) is refused before it loads, in one line with
exit code 2; so is a write that fails later (a full disk), naming the file.
"""

import argparse
import sys
from pathlib import Path

from PIL import PngImagePlugin
from tqdm.auto import tqdm

from minidream import sampling_flags as flags
from minidream.files import atomic_file, prove_writable
from minidream.io.weights import load_pipeline

DEFAULT_OUT = Path("runs/samples")  # inside runs/, which .gitignore keeps out of the repository


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate images from text with a Stable Diffusion 1.x, 2.x or XL checkpoint.")
    parser.add_argument("--weights", required=True, help="SD 1.x/2.x/XL .safetensors/.ckpt file, diffusers folder, or a train.py run folder")
    parser.add_argument("--prompt", help="what to draw (or use --from-file)")
    parser.add_argument("--from-file", type=Path, help="a text file with one prompt per line; each line is one image per --num-images")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default: %(default)s)")
    flags.add_sampling_flags(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet: slow first image, faster after (GPU)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.from_file is None):
        parser.error("give exactly one of --prompt or --from-file")
    if args.num_images < 1:
        parser.error("--num-images must be at least 1")
    flags.check_sampling_flags(parser, args)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = flags.device_and_dtype(args)
    made = missing_folders(args.out)
    try:
        prompts = read_prompts(args)
        flags.check_image_size_flags(args)
        prove_writable(args.out)  # an unwritable --out fails now, not after the model loads
        pipe = load_pipeline(args.weights, device=device, dtype=dtype, loras=args.lora, prediction_type=args.prediction_type)
        flags.check_flags_fit(args, pipe)
        flags.fill_model_defaults(args, pipe.config)
        flags.use_flag_spacing(args, pipe)
    except (ValueError, OSError) as error:  # WeightsError and ConfigError are ValueErrors; WriteError an OSError
        remove_empty(made)
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.compile:
        pipe.unet.compile(fullgraph=True)
    sampling, hashes = flags.sampling_of(args), flags.lora_hashes(args)
    jobs = [(p, args.seed + i) for p in prompts for i in range(args.num_images)]
    try:
        for start in tqdm(range(0, len(jobs), args.batch_size), desc="images", unit="batch"):
            batch = jobs[start : start + args.batch_size]
            images = flags.draw(pipe, [p for p, _ in batch], [s for _, s in batch], sampling, show_progress=True)
            for offset, ((prompt, seed), image) in enumerate(zip(batch, images)):
                info = PngImagePlugin.PngInfo()
                info.add_text("parameters", flags.parameters_text(args, prompt, seed, hashes))
                with atomic_file(args.out / f"{start + offset:05d}-{seed}.png") as tmp:
                    image.save(tmp, format="PNG", pnginfo=info)
    except OSError as error:  # a full disk, a folder made read-only meanwhile: WriteError names the file
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(jobs)} image(s) to {args.out}/")
    return 0


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, innermost first."""
    return [p for p in (folder, *folder.parents) if not p.exists()]


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run made (innermost first) when a refusal leaves them empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


if __name__ == "__main__":
    sys.exit(main())
