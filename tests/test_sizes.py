"""The size rule (issue 26, issue 32 item 2): an image side is any positive multiple of 8, the VAE's
downsampling, for every model, as in diffusers. 72x56 makes 9x7 latents, which no UNet level halves
evenly: each downsampling rounds up and each upsampling returns to its skip connection's size. Sampled
there through sample.py (tiny SD 1.x) and generate (tiny SDXL) against diffusers' pipelines at the
same size, and trained at data.resolution=72 (class images, steps, checkpoint, grid)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sample_runs import DIFFUSERS_SCHEDULER_MARKS, max_difference, reference_images
from safetensors.torch import load_file
from test_sampling_parity import NEGATIVE, PROMPT, TOLERANCE, reference, run_sample, single_thread, tiny_folder  # noqa: F401 (fixtures)
from test_sdxl_sampling import listening_pipeline, reference_of
from train_runs import TINY_CONFIG, metrics

import train
from minidream.diffusion.sampling import generate
from minidream.models.tokenizer import CLIPTokenizer

pytestmark = DIFFUSERS_SCHEDULER_MARKS

HEIGHT, WIDTH = 56, 72  # multiples of 8, not of 16 (TINY's old rule), 32 (SDXL's) or 64 (SD 1.x/2.x's)
STEPS, IMAGES = 3, 2


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL that listens to its prompt and sizes (test_sdxl_sampling) and diffusers' pipeline on it."""
    tokenizer_folder = tmp_path_factory.mktemp("tokenizer")
    CLIPTokenizer().save_folder(tokenizer_folder)
    pipe = listening_pipeline()
    return pipe, reference_of(pipe, tokenizer_folder)


# Measured max |pixel difference| (torch 2.13 CPU, diffusers 0.42.1): 1 level in each of the four cases.
@pytest.mark.parametrize("sampler, height, width, seed", [("ddim", HEIGHT, WIDTH, 5), ("euler-a", WIDTH, HEIGHT, 6)],
                         ids=["ddim-72x56", "euler-a-56x72"])
def test_sample_py_at_sides_that_are_multiples_of_8_only_gives_diffusers_images(
    sample, tiny_folder, reference, tmp_path, sampler, height, width, seed
):
    ours = run_sample(sample, tiny_folder, tmp_path, seed, IMAGES, STEPS, sampler, 7.5, height, width)
    theirs = reference_images(reference, PROMPT, NEGATIVE, seed, IMAGES, STEPS, sampler, 7.5, height, width)
    assert ours[0].shape == (height, width, 3)
    assert max_difference(ours, theirs) <= TOLERANCE
    assert all(image.std() > 10 for image in ours)  # an image, not a flat field that would match anything


@pytest.mark.parametrize("sampler, negative", [("euler", NEGATIVE), ("dpmpp-2m", None)], ids=["euler", "dpmpp-2m-no-negative"])
def test_sdxl_at_sides_that_are_multiples_of_8_only_gives_diffusers_images(sdxl, sampler, negative):
    pipe, reference = sdxl
    seeds = [7 + i for i in range(IMAGES)]
    got = generate(pipe, [PROMPT] * IMAGES, seeds, None if negative is None else [negative] * IMAGES,
                   steps=STEPS, sampler=sampler, height=HEIGHT, width=WIDTH)  # fmt: skip
    ours = [np.asarray(image) for image in got]
    theirs = reference_images(reference, PROMPT, negative, seeds[0], IMAGES, STEPS, sampler, 5.0, HEIGHT, WIDTH)
    assert max_difference(ours, theirs) <= TOLERANCE
    assert all(image.std() > 10 for image in ours)


def test_a_run_at_a_resolution_that_is_a_multiple_of_8_only_trains(tmp_path, one_thread):
    """data.resolution=72 (9x9 latents) with the embedded default: the example subject drawn at 72,
    class images generated at 72x72, two steps with finite losses, a checkpoint, a grid and the export."""
    run_dir = tmp_path / "run"
    assert train.main([
        "--config", str(TINY_CONFIG), f"run.output_dir={run_dir}", f"data.class_dir={tmp_path / 'class'}",
        "data.resolution=72", "data.num_class_images=2", "data.class_steps=2", "train.max_steps=2",
        "checkpoint.every_n_steps=2", "validation.every_n_steps=2", "validation.steps=2",
        "validation.prompts=[a photo of sks toy]", "run.log_every_n_steps=1",
    ]) == 0  # fmt: skip
    assert {Image.open(path).size for path in (tmp_path / "class").glob("*.png")} == {(72, 72)}
    losses = [record["loss"] for record in metrics(run_dir)]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert [path.name for path in (run_dir / "checkpoints").iterdir()] == ["step-00000002"]
    assert Image.open(run_dir / "samples" / "step-00000002.png").height == 72  # one row of 72x72 images
    assert all(torch.isfinite(tensor).all() for tensor in load_file(run_dir / "model.safetensors").values())
