"""Convert a Stable Diffusion 1.x checkpoint between formats.

    python -m minidream.convert SRC DST [--format single-file|diffusers] [--dtype fp16|fp32] [--ema]
"""

import argparse
import sys
from pathlib import Path

from minidream.io.weights import FORMATS, WeightsError, load_pipeline, save_pipeline
from minidream.models.precision import DTYPES

FILE_PRECISIONS = ("fp16", "fp32")  # what SD files are released in

DESCRIPTION = """\
Convert a Stable Diffusion 1.x checkpoint between formats.

SRC may be
  an SD single file       *.safetensors, or *.ckpt / *.pt (read with torch.load(weights_only=True))
  a diffusers folder      model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
  a minidream run folder  the model.safetensors that train.py exported

DST is written as
  single-file   one *.safetensors with the UNet, VAE and text encoder under the SD key names
                (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*),
                which AUTOMATIC1111, ComfyUI and diffusers' from_single_file open
  diffusers     a folder that diffusers.StableDiffusionPipeline.from_pretrained opens, with a
                DDIM scheduler carrying SRC's noise-schedule settings

The write is atomic: DST appears complete or not at all. An existing DST file is replaced; an
existing non-empty DST folder is refused.
"""

EXAMPLES = """\
examples:
  python -m minidream.convert weights/stable-diffusion-v1-5 weights/sd15.safetensors
  python -m minidream.convert weights/sd-v1-4.ckpt weights/sd14-diffusers
  python -m minidream.convert weights/sd-v1-4-full-ema.ckpt weights/sd14-ema.safetensors --ema --dtype fp32
  python -m minidream.convert runs/dreambooth weights/my-dog.safetensors
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m minidream.convert",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint file or folder to read")
    parser.add_argument("dst", metavar="DST", help="file (*.safetensors) or folder to write")
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="layout of DST (default: single-file if DST ends in .safetensors, else diffusers)",
    )
    parser.add_argument(
        "--dtype",
        choices=FILE_PRECISIONS,
        default="fp16",
        help="precision of the written weights (default: fp16, as SD releases are)",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="take the UNet from SRC's EMA weights (model_ema.*, in full training checkpoints such as "
        "sd-v1-4-full-ema.ckpt); '-emaonly' files hold them as the model already and need no flag",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_format = args.format or ("single-file" if Path(args.dst).suffix == ".safetensors" else "diffusers")
    try:
        pipe = load_pipeline(args.src, use_ema=args.ema)
        save_pipeline(pipe, args.dst, format=output_format, dtype=DTYPES[args.dtype])
    except (WeightsError, OSError) as error:  # bad input or an unwritable destination: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({output_format}, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
