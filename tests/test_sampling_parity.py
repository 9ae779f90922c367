"""Same seed, same image: sample.py against diffusers' StableDiffusionPipeline.

Both read one folder that diffusers' own save_pretrained wrote (a tiny random pipeline), and
are given the same prompt, negative prompt, seed, steps, guidance and sampler; diffusers gets
one CPU generator per image, seeded seed + i, as DESIGN.md's seed rule says. Then the same at
the full SD 1.5 shapes, with random weights.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from reference_models import SD15_UNET_CONFIG, SD15_VAE_CONFIG, seeded_diffusers_model
from sample_runs import (
    DIFFUSERS_SCHEDULER_MARKS,
    SD15_SCHEDULER,
    load_reference,
    max_difference,
    one_torch_thread,
    read_pngs,
    reference_images,
    save_tiny_diffusers_pipeline,
)
from test_weights_sd15 import seeded_text_encoder
from transformers import CLIPTokenizer as TransformersCLIPTokenizer

from minidream.config import SD15
from minidream.diffusion.sampling import (
    decode_latents,
    denoise,
    encode_prompts,
    image_generators,
)
from minidream.io.diffusers_layout import unet_from_diffusers, vae_from_diffusers
from minidream.io.tensor_files import with_text_model_prefix
from minidream.models.clip import CLIPTextModel
from minidream.models.pipeline import Pipeline
from minidream.models.tokenizer import CLIPTokenizer
from minidream.models.unet import UNet
from minidream.models.vae import AutoencoderKL

pytestmark = DIFFUSERS_SCHEDULER_MARKS

PROMPT = "a photo of sks dog on the beach"
NEGATIVE = "blurry, low quality"
# Max |pixel difference| allowed, in 8-bit levels: float rounding in the two VAE decoders.
# Measured (torch 2.13 CPU, diffusers 0.42.1): at most 1 level in every case below (0 in some).
# sample.py denoises --batch-size images at a time, diffusers all of them at once, and batched
# matmuls round differently; with equal batches the latents agree bit for bit (test_weights.py).
TOLERANCE = 1


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_diffusers_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="module")
def reference(tiny_folder):
    return load_reference(tiny_folder)


def run_sample(sample, folder, out, seed, num_images, steps, sampler, guidance, height, width,
               eta=0.0, karras=False, batch_size=1, prompt=PROMPT, negative_prompt=NEGATIVE, extra=()):
    args = ["--weights", str(folder), "--prompt", prompt, "--negative-prompt", negative_prompt,
            "--seed", str(seed), "--num-images", str(num_images), "--batch-size", str(batch_size),
            "--steps", str(steps), "--sampler", sampler, "--guidance", str(guidance),
            "--height", str(height), "--width", str(width), "--out", str(out), "--dtype", "fp32", "--device", "cpu"]
    args += ["--eta", str(eta)] if eta else []
    args += ["--karras"] if karras else []
    assert sample.main([*args, *extra]) == 0
    return read_pngs(out)


# (sampler, eta, karras, guidance, height, width, seed, batch size): every sampler sample.py
# offers, square and not, guidance on and at 1 (where both skip the unconditional half).
CASES = [
    ("ddim", 0.0, False, 7.5, 64, 64, 0, 1),
    ("ddim", 0.0, False, 1.0, 32, 48, 100, 2),
    ("ddim", 1.0, False, 7.5, 32, 48, 7, 1),
    ("ddpm", 0.0, False, 7.5, 64, 64, 3, 2),
    ("euler-a", 0.0, False, 7.5, 48, 32, 11, 1),
    ("euler-a", 0.0, False, 1.0, 64, 64, 12, 1),
    ("dpmpp-2m", 0.0, False, 7.5, 64, 64, 21, 1),
    ("dpmpp-2m", 0.0, True, 7.5, 32, 48, 31, 2),
    ("euler", 0.0, False, 7.5, 32, 48, 41, 1),
    ("euler", 0.0, True, 7.5, 48, 32, 42, 2),
    ("heun", 0.0, True, 7.5, 32, 48, 43, 1),
    ("plms", 0.0, False, 7.5, 32, 48, 44, 1),
    ("lms", 0.0, True, 7.5, 32, 48, 45, 1),
    ("dpmpp-2m-sde", 0.0, True, 7.5, 32, 48, 46, 2),
    ("unipc", 0.0, False, 7.5, 48, 32, 47, 1),
    ("unipc", 0.0, True, 7.5, 32, 48, 48, 1),
]
CASE_IDS = ["ddim", "ddim-guidance1-nonsquare", "ddim-eta1", "ddpm", "euler-a-tall", "euler-a-guidance1",
            "dpmpp-2m", "dpmpp-2m-karras", "euler", "euler-karras", "heun-karras", "plms", "lms-karras", "dpmpp-2m-sde-karras", "unipc",
            "unipc-karras"]


@pytest.mark.parametrize("sampler, eta, karras, guidance, height, width, seed, batch_size", CASES, ids=CASE_IDS)
def test_sample_py_gives_diffusers_images(tiny_folder, reference, sample, tmp_path,
                                          sampler, eta, karras, guidance, height, width, seed, batch_size):
    num_images, steps = 3, 6
    ours = run_sample(sample, tiny_folder, tmp_path, seed, num_images, steps, sampler, guidance, height, width,
                      eta, karras, batch_size)
    theirs = reference_images(reference, PROMPT, NEGATIVE, seed, num_images, steps, sampler, guidance,
                              height, width, eta, karras)
    assert ours[0].shape == (height, width, 3)
    assert max_difference(ours, theirs) <= TOLERANCE
    # Not vacuous: real images, each different (its own generator).
    assert all(image.std() > 10 for image in ours)
    assert all(max_difference([ours[i]], [ours[i + 1]]) > 10 * TOLERANCE for i in range(num_images - 1))


def test_a_scheduler_config_without_spacing_gives_diffusers_images(tiny_folder, sample, tmp_path):
    """SD 1.x's own scheduler_config.json names no timestep_spacing: Euler then uses diffusers'
    EulerDiscreteScheduler default, "linspace", in both (DDIM's "leading" would be another image)."""
    folder = tmp_path / "silent"
    shutil.copytree(tiny_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    del config["timestep_spacing"]
    config_file.write_text(json.dumps(config))
    settings = dict(seed=51, num_images=2, steps=6, sampler="euler", guidance=7.5, height=32, width=48)
    ours = run_sample(sample, folder, tmp_path / "silent-out", **settings)
    assert max_difference(ours, reference_images(load_reference(folder), PROMPT, NEGATIVE, **settings)) <= TOLERANCE
    leading = run_sample(sample, tiny_folder, tmp_path / "leading-out", **settings)
    assert max_difference(ours, leading) > 10 * TOLERANCE


@pytest.mark.parametrize("sampler, spacing", [("euler", "trailing"), ("ddim", "linspace"), ("dpmpp-2m", "trailing")])
def test_timestep_spacing_flag_gives_diffusers_images_with_that_spacing(tiny_folder, sample, tmp_path, sampler, spacing):
    """--timestep-spacing X on a folder whose config says "leading" equals diffusers given a
    scheduler config saying X (what `from_config(config, timestep_spacing=X)` builds)."""
    folder = tmp_path / spacing
    shutil.copytree(tiny_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"timestep_spacing": spacing}))
    settings = dict(seed=61, num_images=2, steps=6, sampler=sampler, guidance=7.5, height=32, width=48)
    ours = run_sample(sample, tiny_folder, tmp_path / "flag", **settings, extra=("--timestep-spacing", spacing))
    assert max_difference(ours, reference_images(load_reference(folder), PROMPT, NEGATIVE, **settings)) <= TOLERANCE
    assert max_difference(ours, run_sample(sample, tiny_folder, tmp_path / "config", **settings)) > 10 * TOLERANCE
    text = Image.open(next((tmp_path / "flag").glob("*.png"))).text["parameters"]
    assert f"Timestep spacing: {spacing}" in text


def penultimate_layer_embeds(reference, prompt: str) -> torch.Tensor:
    """The text states a UI's "clip skip 2" conditions on: the penultimate layer, then the final
    norm. (diffusers' own clip_skip reads text_encoder.text_model, which transformers 5 removed.)"""
    ids = reference.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = reference.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        return reference.text_encoder.final_layer_norm(hidden)


@pytest.mark.parametrize("flag", ["--guidance-rescale", "--clip-skip"])
def test_guidance_rescale_and_clip_skip_give_diffusers_images(tiny_folder, reference, sample, tmp_path, flag):
    settings = dict(seed=9, num_images=2, steps=6, sampler="ddim", guidance=7.5, height=32, width=48)
    if flag == "--guidance-rescale":
        ours = run_sample(sample, tiny_folder, tmp_path / "with", **settings, extra=[flag, "0.7"])
        theirs = reference_images(reference, PROMPT, NEGATIVE, **settings, guidance_rescale=0.7)
    else:
        ours = run_sample(sample, tiny_folder, tmp_path / "with", **settings, extra=[flag, "2"])
        embeds = {"prompt_embeds": penultimate_layer_embeds(reference, PROMPT),
                  "negative_prompt_embeds": penultimate_layer_embeds(reference, NEGATIVE)}
        theirs = reference_images(reference, None, None, **settings, **embeds)
    assert max_difference(ours, theirs) <= TOLERANCE
    without = run_sample(sample, tiny_folder, tmp_path / "without", **settings)
    assert max_difference(ours, without) > 10 * TOLERANCE  # the option did change the image


def test_the_prompt_and_the_negative_prompt_change_the_image(tiny_folder, sample, tmp_path):
    """Guards the parity test above: if the text barely moved the image, a prompt, negative
    prompt or guidance mistake would stay within TOLERANCE."""
    settings = dict(seed=5, num_images=1, steps=6, sampler="ddim", guidance=7.5, height=32, width=48)
    base = run_sample(sample, tiny_folder, tmp_path / "base", **settings)
    other_prompt = run_sample(sample, tiny_folder, tmp_path / "prompt", prompt="an oil painting of a lighthouse", **settings)
    other_negative = run_sample(sample, tiny_folder, tmp_path / "negative", negative_prompt="", **settings)
    assert max_difference(base, other_prompt) > 10 * TOLERANCE
    assert max_difference(base, other_negative) > 10 * TOLERANCE


def test_guidance_below_one_is_classifier_free_guidance_in_minidream_but_off_in_diffusers(
    tiny_folder, reference, sample, tmp_path
):
    """A known, deliberate difference. diffusers turns guidance off for guidance_scale <= 1 and
    then ignores the negative prompt; minidream skips the unconditional half only at exactly 1
    and otherwise applies uncond + g (cond - uncond), so g = 0 is the negative prompt's image
    and 0 < g < 1 lies between the two."""
    settings = dict(seed=9, num_images=1, steps=6, sampler="ddim", height=32, width=48)
    diffusers_half = reference_images(reference, PROMPT, NEGATIVE, guidance=0.5, **settings)
    diffusers_one = reference_images(reference, PROMPT, NEGATIVE, guidance=1.0, **settings)
    assert max_difference(diffusers_half, diffusers_one) == 0  # diffusers: 0.5 is the same as 1

    ours_half = run_sample(sample, tiny_folder, tmp_path / "half", guidance=0.5, **settings)
    ours_zero = run_sample(sample, tiny_folder, tmp_path / "zero", guidance=0.0, **settings)
    assert max_difference(ours_half, diffusers_half) > TOLERANCE  # measured: 13 levels
    assert max_difference(ours_zero, diffusers_one) > 10 * TOLERANCE  # diffusers at 0 is its image at 1
    # minidream at 0 = the negative prompt alone = diffusers with it as the prompt, unguided.
    negative_alone = reference_images(reference, NEGATIVE, "", guidance=1.0, **settings)
    assert max_difference(ours_zero, negative_alone) <= TOLERANCE


# ---- the full SD 1.5 shapes ---------------------------------------------------------------------


def sharing_weights(model_class, cfg, state_dict):
    """A minidream model built on the meta device that takes `state_dict`'s tensors as its own."""
    with torch.device("meta"):
        model = model_class(cfg)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


@pytest.mark.sd_shapes
@torch.no_grad()
def test_sd15_shapes_ddim_two_steps_match_diffusers(tmp_path):
    """The SD 1.5 architecture (random weights, fp32), 2 DDIM steps with guidance 7.5, at 256x256.

    minidream's models share diffusers' weight storage, so one copy of SD 1.5 (about 4.3 GB
    in fp32) is in memory; peak RSS measured 5.0 GB, time about 45 s on one CPU thread.
    """
    size, seed, steps, guidance = 256, 3, 2, 7.5
    CLIPTokenizer().save_folder(tmp_path / "tokenizer")
    reference = StableDiffusionPipeline(
        unet=seeded_diffusers_model(UNet2DConditionModel, SD15_UNET_CONFIG, 0),
        vae=seeded_diffusers_model(DiffusersAutoencoderKL, SD15_VAE_CONFIG, 1),
        text_encoder=seeded_text_encoder(2),
        tokenizer=TransformersCLIPTokenizer.from_pretrained(tmp_path / "tokenizer"),
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    pipe = Pipeline(
        unet=sharing_weights(UNet, SD15.unet, unet_from_diffusers(reference.unet.state_dict(), SD15.unet)),
        vae=sharing_weights(AutoencoderKL, SD15.vae, vae_from_diffusers(reference.vae.state_dict(), SD15.vae)),
        text_encoder=sharing_weights(CLIPTextModel, SD15.text_encoder,
                                     with_text_model_prefix(reference.text_encoder.state_dict())),
        tokenizer=CLIPTokenizer(),
        config=SD15,
    )

    # diffusers: its pipeline to the latents, then its own decode and post-processing.
    generator = [torch.Generator("cpu").manual_seed(seed)]
    their_latents = reference(PROMPT, negative_prompt=NEGATIVE, generator=generator, num_inference_steps=steps,
                              guidance_scale=guidance, height=size, width=size, output_type="latent").images
    decoded = reference.vae.decode(their_latents / reference.vae.config.scaling_factor).sample
    theirs = [np.asarray(image) for image in reference.image_processor.postprocess(decoded, output_type="pil")]
    # minidream: the steps of sampling.generate, so the latents can be compared too.
    cond, uncond = encode_prompts(pipe, [PROMPT]), encode_prompts(pipe, [NEGATIVE])
    our_latents = denoise(pipe, cond, uncond, image_generators([seed]), (4, size // 8, size // 8), "ddim", steps, guidance)
    ours = list(decode_latents(pipe, our_latents))

    # Measured: the latents are bitwise equal and the images differ by at most 1 level.
    assert (our_latents - their_latents).abs().max() <= 1e-5 * their_latents.abs().max()
    assert max_difference(ours, theirs) <= TOLERANCE
    assert ours[0].shape == (size, size, 3) and ours[0].std() > 10
