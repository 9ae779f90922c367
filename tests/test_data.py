"""Image loading, transforms and folder checks, on real photos and broken files."""

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from photo_sets import square_pixels
from PIL import Image

from minidream.training.data import (
    DataError,
    load_image,
    scan_images,
)

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "dreambooth"


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def gradient(size=(80, 60)) -> Image.Image:
    """A left-to-right red ramp, so orientation and flips are visible in the pixels."""
    w, h = size
    ramp = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))
    return Image.fromarray(np.stack([ramp, np.zeros_like(ramp), np.full_like(ramp, 50)], -1), "RGB")


@pytest.mark.parametrize("subject", ["dog", "cat", "backpack", "teapot"])
def test_real_photos_scan_and_transform(subject):
    examples = scan_images(PHOTOS / subject, f"a photo of sks {subject}", 512, skip_bad=False, what="instance")
    assert [e.path.name for e in examples] == sorted(p.name for p in (PHOTOS / subject).glob("*.jpg"))
    assert all(e.prompt == f"a photo of sks {subject}" for e in examples)
    pixels = square_pixels(load_image(examples[0].path), 512, center_crop=True, flip=False)
    assert pixels.shape == (3, 512, 512) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min() < -0.5 and 0.5 < pixels.max() <= 1.0  # real photos span the range


def test_real_photos_smaller_than_resolution_are_reported():
    with pytest.raises(DataError, match=r"5 image\(s\) smaller than data.resolution=1024: 00.jpg \(780x780\)"):
        scan_images(PHOTOS / "dog", "p", 1024, skip_bad=False, what="instance")


def test_resize_is_antialiased_and_center_crop_keeps_the_middle():
    # A 1-pixel checkerboard averages to grey when shrunk with antialiasing; nearest would alias.
    board = Image.fromarray(((np.indices((256, 384)).sum(0) % 2) * 255).astype(np.uint8), "L").convert("RGB")
    pixels = square_pixels(board, 64, center_crop=True, flip=False)
    assert pixels.abs().max() < 0.1
    ramp = square_pixels(gradient((200, 100)), 50, center_crop=True, flip=False)
    # The middle half of a 0..255 ramp: red runs from about 1/4 to 3/4 of full scale.
    red = (ramp[0, 0] + 1) * 127.5
    assert 55 < red[0] < 75 and 180 < red[-1] < 200


def test_flip_mirrors_and_random_crop_follows_the_generator():
    image = gradient((120, 60))
    plain = square_pixels(image, 60, center_crop=True, flip=False)
    assert torch.equal(square_pixels(image, 60, center_crop=True, flip=True), plain.flip(-1))
    crops = [square_pixels(image, 60, False, False, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(crops[0], crops[1]) and not torch.equal(crops[0], crops[2])


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = save(gradient((80, 60)), tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    image = load_image(path)
    assert image.size == (60, 80)
    column = np.asarray(image)[:, 30, 0].astype(int)
    assert column[0] < 40 and column[-1] > 215  # the red ramp now runs top to bottom


def test_modes_are_converted_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))
    assert np.asarray(load_image(save(rgba, tmp_path / "a.png")))[0, 30].tolist() == [255, 255, 255]  # transparent -> white
    assert np.asarray(load_image(tmp_path / "a.png"))[0, 5].tolist() == [0, 0, 255]
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # red in CMYK
    red = np.asarray(load_image(save(cmyk, tmp_path / "c.jpg", quality=95)))[20, 20]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    gray16 = Image.fromarray(np.full((40, 40), 65535 // 2, dtype=np.uint16))
    assert abs(int(np.asarray(load_image(save(gray16, tmp_path / "g16.png")))[0, 0, 0]) - 128) <= 1
    gray = Image.new("L", (40, 40), 77)
    assert np.asarray(load_image(save(gray, tmp_path / "g.png")))[0, 0].tolist() == [77, 77, 77]
    palette = Image.new("P", (40, 40), 3)
    assert load_image(save(palette, tmp_path / "p.png")).mode == "RGB"


def broken_folder(tmp_path) -> Path:
    folder = tmp_path / "broken"
    folder.mkdir()
    save(gradient((600, 600)), folder / "good.jpg")
    buffer = io.BytesIO()
    gradient((600, 600)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "notes.png").write_text("this is not an image")
    return folder


def test_undecodable_files_are_named_or_skipped(tmp_path):
    folder = broken_folder(tmp_path)
    with pytest.raises(DataError, match=r"notes.png: cannot decode image .*data.skip_bad_images=true"):
        scan_images(folder, "p", 512, skip_bad=False, what="instance")
    (folder / "notes.png").unlink()
    with pytest.raises(DataError, match=r"truncated.jpg: cannot decode image"):
        scan_images(folder, "p", 512, skip_bad=False, what="instance")
    (folder / "notes.png").write_text("still not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        examples = scan_images(folder, "p", 512, skip_bad=True, what="instance")
    assert [e.path.name for e in examples] == ["good.jpg"]
    assert sorted(str(w.message).split(":")[0].split("/")[-1] for w in caught) == ["notes.png", "truncated.jpg"]


def test_missing_empty_and_tiny_folders(tmp_path):
    with pytest.raises(DataError, match=r"instance folder .*nowhere does not exist"):
        scan_images(tmp_path / "nowhere", "p", 64, False, "instance")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no usable images"):
        scan_images(tmp_path / "empty", "p", 64, False, "class")
    (tmp_path / "tiny").mkdir()
    save(gradient((16, 16)), tmp_path / "tiny" / "t.png")
    with pytest.raises(DataError, match=r"t.png \(16x16\); use larger images or lower data.resolution"):
        scan_images(tmp_path / "tiny", "p", 64, False, "instance")


def test_caption_files_override_the_prompt(tmp_path):
    save(gradient((64, 64)), tmp_path / "a.png")
    save(gradient((64, 64)), tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a photo of sks dog on a sofa\n")
    examples = scan_images(tmp_path, "a photo of sks dog", 64, False, "instance")
    assert [e.prompt for e in examples] == ["a photo of sks dog on a sofa", "a photo of sks dog"]
