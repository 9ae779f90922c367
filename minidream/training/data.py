"""DreamBooth data: instance and class images, their prompts and transforms.

Everything that can be wrong with the data (missing folder, no images, undecodable or too
small files, bad masks) is found by `scan_images` before any model is loaded. Images are decoded
when a batch needs them, so memory does not grow with the number of images.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from minidream.training.buckets import Size, cover_scale, nearest_bucket

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "F")
MASK_SUFFIX = ".mask.png"  # photo.mask.png beside photo.jpg: its loss mask (training/masks.py)


class DataError(ValueError):
    """Training images that cannot be used, with the file and what to do."""


class UndecodableImage(DataError):
    """An image file that does not decode; `reason` is the decoder's, `path` the file."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: cannot decode image ({reason}); remove it or set data.skip_bad_images=true")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class Example:
    """One training image and the prompt it is trained with."""

    path: Path
    prompt: str
    size: Size = (0, 0)  # (width, height), upright
    mask: Path | None = None  # photo.mask.png, with data.masks


# Part of every latent-cache key: raise it when load_image or Placement.apply change the pixels a
# file gives (decoding, EXIF, alpha, 16-bit scaling, the resize filter), so old entries miss.
PREPROCESSING = "pixels-v1"


@dataclass(frozen=True)
class Placement:
    """How an image becomes the VAE's input: resized to `resized`, cropped at (left, top) to `size`, maybe flipped."""

    resized: Size
    left: int
    top: int
    size: Size
    flip: bool

    @property
    def key(self) -> str:
        """Everything that decides the VAE input besides the file: the latent cache's transform key."""
        return f"{PREPROCESSING} resize={self.resized[0]}x{self.resized[1]} crop={self.left},{self.top},{self.size[0]}x{self.size[1]} flip={int(self.flip)}"

    def size_ids(self, original: Size) -> list[int]:
        """SDXL's micro-conditioning of the sample this placement makes from an image of `original`
        (width, height) size (Podell et al. 2023, sec. 2.2), in sgm's order: the original height and
        width before resizing, the crop's top and left corner in the resized image, the size trained
        at. A flipped sample's left is its crop's left edge in the flipped image, as SDXL was trained
        (kohya's correction; diffusers #6234, fixed by flipping before cropping in PR #6547)."""
        left = self.resized[0] - self.left - self.size[0] if self.flip else self.left
        return [original[1], original[0], self.top, left, self.size[1], self.size[0]]

    def apply(self, image: Image.Image, resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
        image = image.resize(self.resized, resample)  # PIL widens the filter when shrinking: antialiased
        image = image.crop((self.left, self.top, self.left + self.size[0], self.top + self.size[1]))
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if self.flip else image


def place(image_size: Size, size: Size, center_crop: bool, flip: bool, generator: torch.Generator | None) -> Placement:
    """Resize to cover `size` (scale = max(w'/w, h'/h)), then crop it: centred, or at random offsets
    drawn from `generator` (left, then top)."""
    width, height = image_size
    scale = cover_scale(image_size, size)
    resized = (max(size[0], round(width * scale)), max(size[1], round(height * scale)))
    if center_crop:
        left, top = (resized[0] - size[0]) // 2, (resized[1] - size[1]) // 2
    else:
        left = int(torch.randint(0, resized[0] - size[0] + 1, (), generator=generator))
        top = int(torch.randint(0, resized[1] - size[1] + 1, (), generator=generator))
    return Placement(resized, left, top, size, flip)


def pixels_of(image: Image.Image) -> torch.Tensor:
    """An RGB image as a 3 x h x w float32 tensor in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1.0


def load_image(path: Path) -> Image.Image:
    """Decode an image file to 8-bit RGB, upright, transparency composited on white."""
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here, not mid-training
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UndecodableImage(path, str(error)) from None
    if image.mode in SIXTEEN_BIT_MODES:
        # 16-bit (or float) grayscale: scale the full range down to 8 bits rather than clipping.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(values * 255.0 / top), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def find_images(folder: str | Path, what: str) -> list[Path]:
    """The image files directly in `folder`, sorted by name (masks, name.mask.png, are not images)."""
    folder = Path(folder)
    if folder.is_file():
        raise DataError(f"{what} folder {folder} is a file, not a folder; name the folder that holds the images")
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} does not exist")
    return sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.lower().endswith(MASK_SUFFIX) and p.is_file()
    )


def scan_images(
    folder: str | Path, prompt: str, resolution: int, skip_bad: bool, what: str, use_captions: bool = True,
    buckets: list[Size] | None = None,
) -> list[Example]:
    """Check every image in `folder` decodes and is at least `resolution` on its shorter side (with
    `buckets`: covers its nearest bucket without upscaling).

    A `name.txt` beside `name.jpg` overrides the prompt for that image (when use_captions).
    Bad files stop with an error naming them, or are skipped with a warning when skip_bad.
    """
    examples, small = [], []
    for path in find_images(folder, what):
        try:
            image = load_image(path)
        except UndecodableImage as error:
            if not skip_bad:
                raise
            # data.skip_bad_images is set: say what is skipped, not how to skip it
            warnings.warn(f"skipping {error.path}: cannot decode ({error.reason})", stacklevel=2)
            continue
        if buckets is None and min(image.size) < resolution:
            small.append(f"{path.name} ({image.size[0]}x{image.size[1]})")
            continue
        if buckets is not None and cover_scale(image.size, bucket := nearest_bucket(image.size, buckets)) > 1:
            small.append(f"{path.name} ({image.size[0]}x{image.size[1]} < bucket {bucket[0]}x{bucket[1]})")
            continue
        caption = path.with_suffix(".txt")
        text = caption.read_text().strip() if use_captions and caption.is_file() else ""
        examples.append(Example(path, text or prompt, image.size))
    if small:
        rule = f"smaller than data.resolution={resolution}" if buckets is None else "smaller than their bucket (never upscaled)"
        raise small_images_error(f"{what} folder {folder}", small, rule)
    if not examples:
        raise DataError(f"{what} folder {folder} holds no usable images ({', '.join(IMAGE_SUFFIXES)})")
    return examples


def small_images_error(
    where: str, small: list[str], rule: str, fix: str = "use larger images or lower data.resolution"
) -> DataError:
    """One line for the images that would have to be upscaled: `rule` says which size they miss."""
    listed = ", ".join(small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
    return DataError(f"{where}: {len(small)} image(s) {rule}: {listed}; {fix}")
