"""Loss masks: `photo.mask.png` beside `photo.jpg`, white = subject, weights the per-pixel loss.

A mask must have its image's size (before any resize), and one of the modes
  L, 1      grey levels / black-and-white: the value is the weight (255 = 1);
  RGB       its luminance (PIL's convert("L")), so a grey or colour-coded export works;
  RGBA      its luminance times its alpha (a transparent pixel is not subject).
Other modes (16-bit, palette, CMYK...) are refused: convert the mask to L. The mask goes
through the image's resize, crop and flip, then is area-averaged to the latent size; the loss of
a sample is the mean over latent pixels of mask * error (kohya's choice: the masked-out part
counts as zero, not as missing, so a small mask trains with a smaller loss). Images without a
mask, and class images, weigh every pixel 1.
"""

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from minidream.training.data import (
    MASK_SUFFIX,
    DataError,
    Example,
    Placement,
    find_images,
)

MASK_MODES = ("L", "1", "RGB", "RGBA")


def mask_path(image: Path) -> Path:
    return image.with_name(image.stem + MASK_SUFFIX)


def with_masks(examples: list[Example], folder: str | Path) -> list[Example]:
    """The examples with their masks attached; a mask without its image, or of the wrong size or mode,
    is an error naming it."""
    folder = Path(folder)
    images = {p.stem for p in find_images(folder, "image")}
    for mask in sorted(p for p in folder.iterdir() if p.name.lower().endswith(MASK_SUFFIX)):
        stem = mask.name[: -len(MASK_SUFFIX)]
        if stem not in images:
            raise DataError(f"{mask}: a mask without its image (no {stem}.jpg, .png, ... beside it); add the image or remove the mask")
    attached = []
    for example in examples:
        mask = mask_path(example.path)
        if mask.is_file():
            check_mask(mask, example)
        attached.append(dataclasses.replace(example, mask=mask if mask.is_file() else None))
    return attached


def check_mask(mask: Path, example: Example) -> None:
    try:
        with Image.open(mask) as opened:
            mode, size = opened.mode, opened.size
    except OSError as error:
        raise DataError(f"{mask}: cannot read the mask ({error}); save it as an 8-bit PNG") from None
    if mode not in MASK_MODES:
        raise DataError(f"{mask}: mask mode {mode} is not one of {', '.join(MASK_MODES)}; save it as 8-bit grey (mode L)")
    if size != example.size:
        raise DataError(f"{mask}: the mask is {size[0]}x{size[1]} but its image {example.path.name} is "
                        f"{example.size[0]}x{example.size[1]}; masks must have their image's size")


def load_mask(mask: Path | None, placement: Placement, latent_size: tuple[int, int]) -> torch.Tensor:
    """The mask as the latent's weights, 1 x 1 x h x w in [0, 1] (ones without a mask)."""
    if mask is None:
        return torch.ones(1, 1, *latent_size)
    with Image.open(mask) as opened:
        opened.load()
        grey = mask_levels(opened)
    grey = placement.apply(grey, Image.Resampling.BILINEAR)
    values = torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[None, None]
    return F.interpolate(values, size=latent_size, mode="area")  # each latent pixel: the mean of its 8x8 pixels


def mask_levels(mask: Image.Image) -> Image.Image:
    """Mode L weights from an accepted mask mode (see the module docstring)."""
    if mask.mode == "RGBA":
        black = Image.new("RGBA", mask.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, mask).convert("L")
    return mask.convert("L")
