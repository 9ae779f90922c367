"""Preprocessing equals transformers' image processors (PIL backend) bit for bit on real photos.

The references: CLIPImageProcessor with its defaults (= openai/clip-vit-*'s
preprocessor_config.json) and ViTImageProcessor as facebook/dino-vits16's
preprocessor_config.json sets it (size 224, resample 2 = bilinear, ImageNet mean/std).
The DreamBooth photos are square; crops of them give landscape and portrait inputs too.
"""

import pytest
import torch
import transformers
from eval_references import PHOTOS
from PIL import Image

from minidream.config import CLIP_PREPROCESS, DINO_PREPROCESS
from minidream.models.preprocess import preprocess

PATHS = sorted(PHOTOS.glob("*/*.jpg"))


def inputs() -> list[Image.Image]:
    photos = [Image.open(path) for path in PATHS]
    first = photos[0].convert("RGB")
    w, h = first.size
    translucent = first.convert("RGBA").resize((300, 260))
    translucent.putalpha(128)
    shapes = [
        first.crop((0, 0, w, h * 2 // 3)),  # landscape: the short side is the height
        first.crop((0, 0, w // 2 + 1, h)),  # portrait, odd width
        first.resize((225, 301)),  # barely larger than the crop
        first.resize((150, 100)),  # smaller than 224: upscaled
        first.convert("L"),  # grayscale
        translucent,  # half transparent: composited over white
    ]
    return photos + shapes


@pytest.fixture(scope="module")
def images():
    assert len(PATHS) >= 20, f"expected the DreamBooth photos under {PHOTOS}"
    return inputs()


def test_clip_preprocessing_equals_clip_image_processor(images):
    reference = transformers.CLIPImageProcessor()
    assert type(reference).__name__ == "CLIPImageProcessorPil"  # the PIL backend, not torchvision's
    expected = torch.from_numpy(reference(images=images, return_tensors="np")["pixel_values"])
    ours = preprocess(images, CLIP_PREPROCESS)
    assert ours.shape == (len(images), 3, 224, 224) and ours.dtype == torch.float32
    assert torch.equal(ours, expected)


def test_dino_preprocessing_equals_vit_image_processor_as_dino_vits16_sets_it(images):
    reference = transformers.ViTImageProcessorPil(
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=2, size={"height": 224, "width": 224},
        do_convert_rgb=True,  # ViT's processor would reject the grayscale and RGBA inputs otherwise
    )  # fmt: skip
    expected = torch.from_numpy(reference(images=images, return_tensors="np")["pixel_values"])
    ours = preprocess(images, DINO_PREPROCESS)
    assert ours.shape == (len(images), 3, 224, 224)
    assert torch.equal(ours, expected)


def test_resize_keeps_the_aspect_and_crops_the_centre():
    """A 448 x 224 image, left half black, right half white: CLIP's crop is the middle 224 columns."""
    image = Image.new("RGB", (448, 224))
    image.paste((255, 255, 255), (224, 0, 448, 224))
    pixels = preprocess([image], CLIP_PREPROCESS)[0, 0]
    assert pixels.shape == (224, 224)
    black, white = (0 - CLIP_PREPROCESS.mean[0]) / CLIP_PREPROCESS.std[0], (1 - CLIP_PREPROCESS.mean[0]) / CLIP_PREPROCESS.std[0]
    assert torch.allclose(pixels[:, :100], torch.tensor(black)) and torch.allclose(pixels[:, 124:], torch.tensor(white))
