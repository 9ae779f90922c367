"""Mixed-aspect photo sets for the data tests, cut from the DreamBooth photos into a tmp folder
(the project never copies the photos): crops of chosen shapes, and masks drawn beside them."""

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from minidream.training.data import pixels_of, place

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dreambooth"

# At data.resolution=64, data.bucket_step=16 the buckets are 48x80, 64x64 and 80x48 (latents 6x10,
# 8x8, 10x6: even, as the tiny UNet's one downsampling needs). These shapes land one per bucket,
# each a little larger than its bucket (never upscaled).
LANDSCAPE, SQUARE, PORTRAIT = (100, 60), (72, 72), (60, 100)
BUCKET_OPTIONS = ("data.resolution=64", "data.buckets=true", "data.bucket_step=16")


def square_pixels(
    image: Image.Image, resolution: int, center_crop: bool, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The training transform without buckets: cover a resolution x resolution square, crop it
    (centred, or at offsets drawn from `generator`), maybe flip; 3 x resolution x resolution in [-1, 1]."""
    return pixels_of(place(image.size, (resolution, resolution), center_crop, flip, generator).apply(image))


def crop_photo(source: Path, size: tuple[int, int]) -> Image.Image:
    """The centre of `source` with the aspect ratio of `size`, resized to `size`."""
    with Image.open(source) as photo:
        photo = photo.convert("RGB")
        width, height = photo.size
        scale = min(width / size[0], height / size[1])
        w, h = round(size[0] * scale), round(size[1] * scale)
        box = ((width - w) // 2, (height - h) // 2, (width - w) // 2 + w, (height - h) // 2 + h)
        return photo.crop(box).resize(size, Image.Resampling.LANCZOS)


def write_crops(folder: Path, subject: str, sizes: list[tuple[int, int]], prefix: str = "") -> list[Path]:
    """The subject's photos in order, photo i cropped to sizes[i], as PNGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = sorted((PHOTOS / subject).glob("*.jpg"))
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"{prefix}{i:02d}.png"
        crop_photo(photos[i % len(photos)], size).save(path)
        paths.append(path)
    return paths


def ellipse_mask(size: tuple[int, int], mode: str = "L") -> Image.Image:
    """White ellipse (the subject) on black, of the image's size."""
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((size[0] // 6, size[1] // 6, size[0] * 5 // 6, size[1] * 5 // 6), fill=255)
    return mask.convert(mode)


def write_two_subjects(folder: Path) -> Path:
    """Two subjects (dog: landscape and square; cat: portrait and square), each with its own class
    folder of other photos at the same shapes, masks beside three instance photos (modes L, 1 and
    RGB) and a caption beside one. 4 + 4 instance and 4 + 4 class images: 8 items an epoch,
    2, 4 and 2 of them in the three buckets."""
    dog = write_crops(folder / "dog", "dog", [LANDSCAPE, LANDSCAPE, SQUARE, SQUARE])
    cat = write_crops(folder / "cat", "cat", [PORTRAIT, PORTRAIT, SQUARE, SQUARE])
    write_crops(folder / "class-dog", "backpack", [LANDSCAPE, LANDSCAPE, SQUARE, SQUARE], prefix="class-")
    write_crops(folder / "class-cat", "teapot", [PORTRAIT, PORTRAIT, SQUARE, SQUARE], prefix="class-")
    for path, mode in ((dog[0], "L"), (dog[2], "1"), (cat[1], "RGB")):
        with Image.open(path) as image:
            ellipse_mask(image.size, mode).save(path.with_name(path.stem + ".mask.png"))
    cat[3].with_suffix(".txt").write_text("a photo of zwx cat on a sofa")
    return folder


def subjects_override(folder: Path | str) -> str:
    """data.subjects for write_two_subjects' folders (`folder` may be train_runs' <data> placeholder)."""
    entries = [
        f"{{instance_dir: '{folder}/{name}', instance_prompt: 'a photo of {identifier} {noun}', class_dir: '{folder}/class-{name}', "
        f"class_prompt: 'a photo of a {noun}', num_class_images: 4, identifier: {identifier}, class_noun: {noun}}}"
        for name, identifier, noun in (("dog", "sks", "dog"), ("cat", "zwx", "cat"))
    ]
    return f"data.subjects=[{', '.join(entries)}]"


def refused_before_models(monkeypatch, capsys, argv: list[str]) -> str:
    """train.main(argv) stops with exit code 2 and one line of error before any model is loaded."""
    import train  # the script at the repository root; only this helper needs it

    def no_models(*args):
        raise AssertionError("a model was loaded before the data and settings were checked")

    monkeypatch.setattr(train, "load_models", no_models)
    assert train.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    return error
