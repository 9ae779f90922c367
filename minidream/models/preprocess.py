"""Photos to the pixel values the evaluation models were trained on, as the reference processors do.

The same steps, in the same order and precision, as transformers' PIL image processors
(`CLIPImageProcessor`, `ViTImageProcessor`): RGB (transparency over white), PIL resize of the
8-bit image, centred crop, x 1/255 in float64 then float32, (x - mean) / std in float32.
That makes the output equal to theirs bit for bit (tests/test_eval_preprocess.py).
"""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from minidream.config import ImagePreprocessConfig

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited over white (as transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resized_size(width: int, height: int, cfg: ImagePreprocessConfig) -> tuple[int, int]:
    """(width, height) after the resize: the short side becomes cfg.size, the long one is
    truncated to an int (not rounded, as transformers does); or size x size for "square"."""
    if cfg.resize == "square":
        return cfg.size, cfg.size
    if cfg.resize != "shortest_edge":
        raise ValueError(f"resize must be 'shortest_edge' or 'square', got {cfg.resize!r}")
    long = int(cfg.size * max(width, height) / min(width, height))
    return (cfg.size, long) if width <= height else (long, cfg.size)


def preprocess_image(image: Image.Image, cfg: ImagePreprocessConfig) -> np.ndarray:
    """One photo -> 3 x S x S float32 pixel values."""
    rgb = to_rgb(image)
    pixels = np.asarray(rgb.resize(resized_size(*rgb.size, cfg), resample=RESAMPLE[cfg.resample]))  # H x W x 3
    if cfg.crop_size is not None:
        crop = cfg.crop_size
        top, left = (pixels.shape[0] - crop) // 2, (pixels.shape[1] - crop) // 2
        pixels = pixels[top : top + crop, left : left + crop]
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    normalised = (scaled - np.array(cfg.mean, dtype=np.float32)) / np.array(cfg.std, dtype=np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def preprocess(images: Sequence[Image.Image], cfg: ImagePreprocessConfig) -> torch.Tensor:
    """B photos (any sizes) -> B x 3 x S x S float32 pixel values."""
    return torch.from_numpy(np.stack([preprocess_image(image, cfg) for image in images]))
