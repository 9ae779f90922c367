"""Convert a Stable Diffusion 1.x, 2.x or XL checkpoint between formats, merge LoRAs into it, or
convert a LoRA file between the kohya and diffusers layouts.

    python -m minidream.convert SRC DST [--format single-file|diffusers] [--dtype fp16|fp32] [--ema] [--lora PATH[:SCALE]]...
    python -m minidream.convert LORA DST --format kohya|diffusers [--base MODEL] [--dtype fp16|fp32]
    python -m minidream.convert TUNED DST.safetensors --extract-lora --base BASE --rank R [--conv-rank R2] [--dtype]
"""

import argparse
import sys
from pathlib import Path

import torch

from minidream.config import FILE_PRECISIONS, SD15
from minidream.io.lora_files import FORMATS as LORA_FORMATS
from minidream.io.lora_extraction import write_extracted_lora
from minidream.io.lora_files import convert_lora_file, is_lora_file, lora_argument
from minidream.io.weights import (
    FORMATS,
    WeightsError,
    load_pipeline,
    model_config,
    save_pipeline,
)
from minidream.models.precision import DTYPES

DESCRIPTION = """\
Convert a Stable Diffusion 1.x, 2.x or XL (SDXL base 1.0 and its fine-tunes) checkpoint between
formats, merge LoRAs into it, or convert a LoRA file between the kohya/A1111 and diffusers layouts.

SRC may be
  an SD single file       *.safetensors, or *.ckpt / *.pt (read with torch.load(weights_only=True)), of
                          SD 1.x, 2.x or XL; SDXL's v-prediction markers (v_pred and ztsnr keys,
                          modelspec.prediction_type metadata) are read
  a diffusers folder      model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
                          (SDXL: also text_encoder_2/, tokenizer_2/)
  a minidream run folder  the model.safetensors that train.py exported
  a LoRA file             *.safetensors with kohya (lora_unet_*, lora_te_*) or diffusers/PEFT
                          (*.lora_A / *.lora_B) keys: converted to the other layout (--format)

DST is written as
  single-file   one *.safetensors with the UNet, VAE and text encoder under the SD key names
                (model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*;
                SDXL: conditioner.embedders.0.transformer.* and .1.model.*, and v_pred/ztsnr for a
                v-prediction model), which AUTOMATIC1111, ComfyUI and diffusers' from_single_file open
  diffusers     a folder that diffusers' StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline)
                .from_pretrained opens, with a DDIM (SDXL: Euler) scheduler carrying SRC's
                noise-schedule settings;
                for a LoRA SRC: a *.safetensors that diffusers' load_lora_weights opens
  kohya         (a LoRA SRC only, the default) the kohya/A1111 layout ComfyUI and AUTOMATIC1111 map

--lora PATH[:SCALE] merges a LoRA into the model at strength SCALE (default 1) before it is
written, as the UIs apply it: in fp32, rounded once to --dtype. Repeat it to merge several.
LyCORIS (LoHa, LoKr), DoRA and full-diff files merge as ComfyUI merges them (docs/lora.md).

--extract-lora writes a kohya LoRA of the difference between SRC (a full fine-tune) and --base
(the model it was tuned from): a truncated SVD of each layer's difference in fp32, on the GPU when
there is one, with .alpha = rank; it prints each layer's kept energy and the worst relative error.
--rank R (or a kept-energy fraction such as 0.9) for Linear and 1x1 layers, --conv-rank for 3x3
convs (default: --rank; 0 leaves them out). Use --dtype fp32 to keep the factors exact.

The write is atomic: DST appears complete or not at all. An existing DST file is replaced; an
existing non-empty DST folder is refused.
"""

EXAMPLES = """\
examples:
  python -m minidream.convert weights/stable-diffusion-v1-5 weights/sd15.safetensors
  python -m minidream.convert weights/sd-v1-4.ckpt weights/sd14-diffusers
  python -m minidream.convert weights/sd_xl_base_1.0.safetensors weights/sdxl-diffusers
  python -m minidream.convert weights/sd-v1-4-full-ema.ckpt weights/sd14-ema.safetensors --ema --dtype fp32
  python -m minidream.convert runs/dreambooth weights/my-dog.safetensors
  python -m minidream.convert weights/sd15.safetensors weights/sd15-my-dog.safetensors --lora runs/my-dog/lora.safetensors:0.8
  python -m minidream.convert runs/my-dog/lora.safetensors weights/my-dog-diffusers-lora.safetensors --format diffusers
  python -m minidream.convert runs/my-dog weights/my-dog-lora.safetensors --extract-lora --base weights/sd15.safetensors --rank 32
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m minidream.convert",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", metavar="SRC", help="checkpoint file or folder, or LoRA file, to read")
    parser.add_argument("dst", metavar="DST", help="file (*.safetensors) or folder to write")
    parser.add_argument(
        "--format",
        choices=(*FORMATS, *[f for f in LORA_FORMATS if f not in FORMATS]),
        help="layout of DST (default: single-file if DST ends in .safetensors, else diffusers; kohya for a LoRA SRC)",
    )
    parser.add_argument(
        "--dtype",
        choices=FILE_PRECISIONS,
        default="fp16",
        help="precision of the written weights (default: fp16, as SD releases and kohya LoRAs are)",
    )
    parser.add_argument(
        "--ema",
        action="store_true",
        help="take the UNet from SRC's EMA weights (model_ema.*, in full training checkpoints such as "
        "sd-v1-4-full-ema.ckpt); '-emaonly' files hold them as the model already and need no flag",
    )
    parser.add_argument(
        "--lora", action="append", type=lora_argument, default=[], metavar="PATH[:SCALE]",
        help="merge this LoRA file into the model at strength SCALE (default 1); repeat for several",
    )  # fmt: skip
    parser.add_argument(
        "--base", metavar="MODEL",
        help="for a LoRA SRC: the model it is for, whose layer shapes it is checked against (default: SD 1.5's); "
        "with --extract-lora: the model SRC was fine-tuned from",
    )  # fmt: skip
    parser.add_argument("--extract-lora", action="store_true",
                        help="write a kohya LoRA of SRC - --base (a truncated SVD per layer) to DST")
    parser.add_argument("--rank", type=rank_argument, default=None, metavar="R",
                        help="with --extract-lora: the rank of each Linear / 1x1 layer, or a kept-energy fraction (0.9)")
    parser.add_argument("--conv-rank", type=rank_argument, default=None, metavar="R",
                        help="with --extract-lora: the rank of each 3x3 conv (default: --rank; 0: no conv adapters)")
    return parser.parse_args(argv)


def rank_argument(text: str) -> int | float:
    """An integer rank (0 or more), or a kept-energy fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rank or a fraction") from None
    if value.is_integer() and value >= 0:
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"{text!r}: a rank is a whole number, a kept-energy fraction lies in (0, 1)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.extract_lora:
            written = extract(args)
        else:
            written = convert_lora(args) if is_lora_file(args.src) else convert_model(args)
    except (ValueError, OSError) as error:  # bad input or an unwritable destination: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({written}, {args.dtype})")
    return 0


def convert_model(args: argparse.Namespace) -> str:
    output_format = args.format or ("single-file" if Path(args.dst).suffix == ".safetensors" else "diffusers")
    if output_format not in FORMATS:
        raise WeightsError(f"{args.src}: --format {output_format} is a LoRA layout, and SRC is a model; "
                           f"write a model as {' or '.join(FORMATS)}")
    if args.base is not None:
        raise WeightsError(f"{args.src}: --base applies to a LoRA SRC; SRC is a model")
    # LoRAs merge into fp32 weights, so the sum is rounded once, to --dtype, when it is written.
    pipe = load_pipeline(args.src, dtype=torch.float32 if args.lora else None, use_ema=args.ema, loras=args.lora)
    save_pipeline(pipe, args.dst, format=output_format, dtype=DTYPES[args.dtype])
    merged = "".join(f" + {path.name}:{scale:g}" for path, scale in args.lora)
    return output_format + merged


def convert_lora(args: argparse.Namespace) -> str:
    output_format = args.format or "kohya"
    if output_format not in LORA_FORMATS:
        raise WeightsError(f"{args.src}: this is a LoRA file; convert it to --format {' or '.join(LORA_FORMATS)}, "
                           f"or merge it into a model with: python -m minidream.convert MODEL DST --lora {args.src}")
    if args.lora or args.ema:
        raise WeightsError(f"{args.src}: this is a LoRA file; --lora and --ema apply to a model SRC")
    cfg = model_config(args.base) if args.base is not None else SD15
    convert_lora_file(args.src, args.dst, output_format, cfg, DTYPES[args.dtype])
    return f"{output_format} LoRA"


def extract(args: argparse.Namespace) -> str:
    if args.base is None or args.rank is None:
        raise WeightsError(f"{args.src}: --extract-lora needs --base (the model SRC was tuned from) and --rank")
    if Path(args.dst).suffix != ".safetensors" or args.lora or args.ema or args.format not in (None, "kohya"):
        raise WeightsError(f"{args.dst}: --extract-lora writes one kohya *.safetensors; --lora, --ema and "
                           "--format single-file/diffusers do not apply")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tuned = load_pipeline(args.src, device=device, dtype=torch.float32)
    base = load_pipeline(args.base, device=device, dtype=torch.float32)
    conv_rank = args.rank if args.conv_rank is None else args.conv_rank
    fits = write_extracted_lora(args.dst, tuned, base, args.rank, conv_rank, DTYPES[args.dtype])
    for fit in fits:
        print(f"{fit.part}.{fit.name}: rank {fit.rank}, kept energy {fit.kept_energy:.6f}, "
              f"relative error {fit.relative_error:.3g}")
    worst = max(fits, key=lambda fit: fit.relative_error)
    print(f"{len(fits)} layers; worst relative error {worst.relative_error:.3g} ({worst.part}.{worst.name}), "
          f"the least energy kept {min(fit.kept_energy for fit in fits):.6f}")
    return f"kohya LoRA extracted at rank {args.rank}, conv rank {conv_rank}"
