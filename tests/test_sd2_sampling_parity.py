"""Issue 18: sample.py on an SD 2-style v-prediction model equals diffusers' StableDiffusionPipeline
with every sampler (linear projections, 64-wide heads, a GELU text encoder, "!" padding).

The folder is minidream's own diffusers export of a random tiny SD 2 pipeline; diffusers and
sample.py both read it, as a user's downloaded SD 2.1 folder would be read."""

import dataclasses

import pytest
from sample_runs import (
    load_reference,
    max_difference,
    one_torch_thread,
    reference_images,
)
from test_sampling_parity import NEGATIVE, PROMPT, TOLERANCE, run_sample

from minidream import save_pipeline
from minidream.config import TINY_SD2
from minidream.models.pipeline import random_pipeline

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    cfg = dataclasses.replace(TINY_SD2, schedule=dataclasses.replace(TINY_SD2.schedule, prediction_type="v_prediction"))
    path = tmp_path_factory.mktemp("sd2") / "tiny-sd2-v"
    save_pipeline(random_pipeline(cfg, seed=7), path, format="diffusers", dtype=None)
    return path


@pytest.mark.parametrize("sampler, eta, karras", [
    ("ddim", 0.0, False), ("ddim", 1.0, False), ("ddpm", 0.0, False), ("euler-a", 0.0, False),
    ("dpmpp-2m", 0.0, False), ("dpmpp-2m", 0.0, True),
], ids=["ddim", "ddim-eta1", "ddpm", "euler-a", "dpmpp-2m", "dpmpp-2m-karras"])
def test_sample_py_gives_diffusers_images_for_a_v_prediction_sd2_model(folder, sample, tmp_path, sampler, eta, karras):
    reference = load_reference(folder)
    assert reference.scheduler.config.prediction_type == "v_prediction"
    assert reference.text_encoder.config.hidden_act == "gelu" and reference.unet.config.use_linear_projection
    ours = run_sample(sample, folder, tmp_path, 4, 2, 6, sampler, 7.5, 32, 48, eta, karras)
    theirs = reference_images(reference, PROMPT, NEGATIVE, 4, 2, 6, sampler, 7.5, 32, 48, eta, karras)
    assert max_difference(ours, theirs) <= TOLERANCE
    assert all(image.std() > 1 for image in ours)  # images, not a constant
