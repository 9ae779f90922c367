"""Loss masks: photo.mask.png beside photo.jpg, checked before any model loads, moved with its image
through resize, crop and flip, area-averaged to the latent size, and weighting the per-pixel loss
(with the plain recipe and with pseudo-Huber + min-SNR)."""

import numpy as np
import pytest
import torch
from photo_sets import ellipse_mask, refused_before_models, write_crops
from PIL import Image
from train_runs import SETUPS, train_args

from minidream.config import ScheduleConfig
from minidream.diffusion import loss_weighting, schedule
from minidream.training.data import DataError, Example, find_images, place, scan_images
from minidream.training.masks import load_mask, with_masks
from minidream.training.recipe import Recipe, recipe_loss

SCHEDULE = ScheduleConfig()
ALPHAS_CUMPROD = schedule.alphas_cumprod_of(SCHEDULE)


def photos_with_mask(folder, mask: Image.Image | None, name="00"):
    write_crops(folder, "dog", [(100, 60), (72, 72)])
    if mask is not None:
        mask.save(folder / f"{name}.mask.png")
    return scan_images(folder, "p", 48, False, "instance")


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "RGBA"])
def test_masks_of_the_documented_modes_are_attached_and_are_not_images(mode, tmp_path):
    examples = with_masks(photos_with_mask(tmp_path, ellipse_mask((100, 60), mode)), tmp_path)
    assert [e.path.name for e in examples] == ["00.png", "01.png"]  # 00.mask.png is no training image
    assert examples[0].mask == tmp_path / "00.mask.png" and examples[1].mask is None
    assert [p.name for p in find_images(tmp_path, "instance")] == ["00.png", "01.png"]


def test_an_rgba_mask_weighs_by_luminance_times_alpha(tmp_path):
    rgba = np.zeros((60, 100, 4), np.uint8)
    rgba[:, :50] = (255, 255, 255, 255)  # white, opaque: subject
    rgba[:, 50:] = (255, 255, 255, 0)  # white but transparent: not subject
    (example,) = with_masks(photos_with_mask(tmp_path, Image.fromarray(rgba, "RGBA")), tmp_path)[:1]
    weights = load_mask(example.mask, place(example.size, (96, 56), True, False, None), (7, 12))
    assert weights[..., :5].min() == 1 and weights[..., 7:].max() == 0


@pytest.mark.parametrize(
    "mask, message",
    [
        (ellipse_mask((50, 30)), r"00.mask.png: the mask is 50x30 but its image 00.png is 100x60; masks must have their image's size"),
        (ellipse_mask((100, 60)).convert("P"), r"00.mask.png: mask mode P is not one of L, 1, RGB, RGBA; save it as 8-bit grey \(mode L\)"),
        (Image.fromarray(np.zeros((60, 100), np.uint16)), r"00.mask.png: mask mode I;16 is not one of L, 1, RGB, RGBA"),
    ],
    ids=["wrong size", "palette", "16-bit"],
)
def test_a_mask_of_the_wrong_size_or_mode_is_named(mask, message, tmp_path):
    examples = photos_with_mask(tmp_path, mask)
    with pytest.raises(DataError, match=message):
        with_masks(examples, tmp_path)


def test_a_mask_without_its_image_is_named(tmp_path):
    examples = photos_with_mask(tmp_path, ellipse_mask((100, 60)), name="07")
    with pytest.raises(DataError, match=r"07.mask.png: a mask without its image \(no 07.jpg, .png, ... beside it\)"):
        with_masks(examples, tmp_path)


def test_a_mask_without_its_image_stops_train_before_any_model_loads(tmp_path, training_data, monkeypatch, capsys):
    orphan = training_data / "dog" / "09.mask.png"
    ellipse_mask((100, 60)).save(orphan)
    try:
        error = refused_before_models(monkeypatch, capsys, train_args(tmp_path / "run", training_data, SETUPS["subjects"].overrides))
    finally:
        orphan.unlink()
    assert error.startswith(f"error: {orphan}: a mask without its image")


def test_the_mask_follows_resize_crop_and_flip_then_is_area_averaged_to_the_latent(tmp_path):
    """Left 30 of 100 columns white; resized to 96x58 and cropped to 96x56, flipped: the white
    band is on the right, and each latent pixel is the mean of its 8x8 block."""
    values = np.zeros((60, 100), np.uint8)
    values[:, :30] = 255
    example = Example(None, "p", (100, 60))
    placement = place(example.size, (96, 56), center_crop=True, flip=True, generator=None)
    mask_image = Image.fromarray(values, "L")
    mask_image.save(tmp_path / "m.mask.png")
    weights = load_mask(tmp_path / "m.mask.png", placement, (7, 12))
    full = torch.from_numpy(np.asarray(placement.apply(mask_image, Image.Resampling.BILINEAR), np.float32) / 255)
    assert weights.shape == (1, 1, 7, 12)
    assert torch.allclose(weights[0, 0], full.reshape(7, 8, 12, 8).mean(dim=(1, 3)), atol=1e-6)
    assert weights[0, 0, :, -3:].min() == 1 and weights[0, 0, :, :8].max() == 0  # the band, mirrored
    assert torch.equal(load_mask(None, placement, (7, 12)), torch.ones(1, 1, 7, 12))


@pytest.mark.parametrize(
    "recipe",
    [Recipe("epsilon", 0, 1000, 1000), Recipe("epsilon", 0, 1000, 1000, snr_gamma=5.0, loss="huber", huber_c=0.1)],
    ids=["plain mse", "huber + min-SNR"],
)
def test_the_masked_loss_is_the_mean_of_mask_times_error_per_sample(recipe):
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(4, 4, 6, 10, generator=g), torch.randn(4, 4, 6, 10, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    mask = torch.cat([torch.rand(2, 1, 6, 10, generator=g), torch.ones(2, 1, 6, 10)])  # class samples unmasked
    total, instance, prior, _ = recipe_loss(prediction, target, t, ALPHAS_CUMPROD, recipe, 2, 0.5, mask)

    diff = prediction - target
    if recipe.loss == "mse":
        elementwise, weights = diff**2, torch.ones(4)
    else:
        c = loss_weighting.huber_c_schedule("snr", 0.1, t, ALPHAS_CUMPROD, 1000).reshape(4, 1, 1, 1)
        elementwise = 2 * c * (torch.sqrt(diff**2 + c**2) - c)
        weights = loss_weighting.min_snr_weights(loss_weighting.snr(ALPHAS_CUMPROD, t), 5.0, "epsilon")
    per_sample = (mask * elementwise).mean(dim=(1, 2, 3)) * weights
    assert torch.allclose(instance, per_sample[:2].mean(), rtol=1e-5)
    assert torch.allclose(prior, per_sample[2:].mean(), rtol=1e-5)
    assert torch.allclose(total, instance + 0.5 * prior, rtol=1e-6)
    # A mask of ones is no mask.
    unmasked = recipe_loss(prediction, target, t, ALPHAS_CUMPROD, recipe, 2, 0.5)
    ones = recipe_loss(prediction, target, t, ALPHAS_CUMPROD, recipe, 2, 0.5, torch.ones(4, 1, 6, 10))
    assert all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(unmasked, ones))
    # Zero where the error is: the masked-out pixels add nothing.
    half = torch.zeros(4, 1, 6, 10)
    half[..., :5] = 1
    moved = prediction.clone()
    moved[..., 5:] += 100
    assert torch.allclose(recipe_loss(moved, target, t, ALPHAS_CUMPROD, recipe, 2, 0.5, half)[0],
                          recipe_loss(prediction, target, t, ALPHAS_CUMPROD, recipe, 2, 0.5, half)[0])
