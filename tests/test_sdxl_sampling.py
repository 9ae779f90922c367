"""SDXL sampling against diffusers' StableDiffusionXLPipeline on the same TINY_SDXL weights:
the prompt conditioning (both encoders' states and the pooled vector, the zeroed negative),
clip skip, every sampler with and without a negative prompt at a non-square size, the size
conditioning, and sample.py's flags, defaults and PNG text."""

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from PIL import Image
from reference_models import relative_error
from sample_runs import DIFFUSERS_SCHEDULER_MARKS, max_difference, one_torch_thread, read_pngs, reference_images
from sdxl_reference import diffusers_pipeline, spread_weights

from minidream import save_pipeline
from minidream.config import SAMPLERS, TINY, TINY_SDXL
from minidream.diffusion.sampling import (
    SizeConditioning,
    clip_skip_limit,
    encode_prompts,
    family_defaults,
    generate,
    negative_conditioning,
)
from minidream.models.pipeline import random_pipeline
from minidream.models.tokenizer import CLIPTokenizer
from minidream.sampling_flags import check_flags_fit, fill_model_defaults, parameters_text

pytestmark = DIFFUSERS_SCHEDULER_MARKS

PROMPT = "a photo of sks dog on the beach"
PROMPTS = [PROMPT, "an oil painting of a lighthouse"]
NEGATIVE = "blurry, low quality"
HEIGHT, WIDTH = 64, 96  # not square (any multiples of 8 work: tests/test_sizes.py samples 72x56)
STEPS, SEED, IMAGES = 4, 3, 2
TOLERANCE = 1  # 8-bit levels: float rounding in the two VAE decoders (test_sampling_parity.py)
# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json. Loaded as users load
# it, EulerDiscreteScheduler.from_config keeps DDIM's clip_sample and set_alpha_to_one (False) in
# its config for `DDIMScheduler.from_config(pipe.scheduler.config)`.
SDXL_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    interpolation_type="linear", sample_max_value=1.0, skip_prk_steps=True, trained_betas=None, use_karras_sigmas=False,
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_torch_thread():
        yield


def listening_pipeline(config=TINY_SDXL):
    """A tiny random SDXL whose images visibly depend on the prompt, the negative prompt and the
    size ids, so a mistake in any of them cannot hide within TOLERANCE.

    At spread_weights' usual std 0.05 they barely matter (measured: zeroing the context moved the
    UNet's output by 0.5 %, a prompt swap changed no pixel by more than 1 level). So: std 0.2;
    the UNet's last conv x2, for an output near unit variance; label_emb's last layer x4, so that
    y counts; and the VAE's conv_out x0.1, else 92 % of the pixels clip to 0 or 255."""
    pipe = spread_weights(random_pipeline(config, seed=0), std=0.2)
    with torch.no_grad():
        for layer, factor in [(pipe.unet.out[2], 2.0), (pipe.unet.label_emb[0][2], 4.0), (pipe.vae.decoder.conv_out, 0.1)]:
            layer.weight.mul_(factor)
            layer.bias.mul_(factor)
    return pipe


def reference_of(pipe, tokenizer_folder, scheduler_config=SDXL_SCHEDULER):
    reference = diffusers_pipeline(pipe, tokenizer_folder, EulerDiscreteScheduler.from_config(scheduler_config))
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.fixture(scope="module")
def pipe():
    return listening_pipeline()


@pytest.fixture(scope="module")
def reference(pipe, tokenizer_folder):
    return reference_of(pipe, tokenizer_folder)


def diffusers_encode(reference, negative_prompt, clip_skip=None):
    """diffusers' encode_prompt under guidance: (prompt_embeds, negative_prompt_embeds, pooled, negative pooled)."""
    with torch.no_grad():
        return reference.encode_prompt(
            PROMPTS, device="cpu", do_classifier_free_guidance=True, negative_prompt=negative_prompt, clip_skip=clip_skip
        )


def assert_conditioning_equal(conditioning, states, pooled):
    assert torch.equal(conditioning.context, states)
    # float rounding in the projection (measured: 5e-9 on values near 0.03); zeros exactly
    assert (conditioning.pooled - pooled).abs().max() <= 1e-6 * pooled.abs().max()


# ---- the prompt conditioning ---------------------------------------------------------------------


def test_encode_prompts_equals_diffusers_encode_prompt_with_a_negative_prompt(pipe, reference):
    states, negative_states, pooled, negative_pooled = diffusers_encode(reference, [NEGATIVE] * 2)
    cond = encode_prompts(pipe, PROMPTS)
    assert cond.context.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)  # 32 + 32 wide; bigG's pooled width
    assert_conditioning_equal(cond, states, pooled)
    assert_conditioning_equal(negative_conditioning(pipe, [NEGATIVE] * 2, cond, None), negative_states, negative_pooled)


def test_no_negative_prompt_is_zeros_and_an_explicit_empty_one_is_encoded(pipe, reference):
    """diffusers' force_zeros_for_empty_prompt (SDXL base sets it): no negative prompt = zero
    states and pooled vector; "" is a prompt like any other (diffusers, ComfyUI; A1111 zeroes it)."""
    cond = encode_prompts(pipe, PROMPTS)
    _, zero_states, _, zero_pooled = diffusers_encode(reference, None)
    none = negative_conditioning(pipe, None, cond, None)
    assert not zero_states.any() and not zero_pooled.any()
    assert_conditioning_equal(none, zero_states, zero_pooled)
    _, empty_states, _, empty_pooled = diffusers_encode(reference, "")
    empty = negative_conditioning(pipe, [""] * 2, cond, None)
    assert_conditioning_equal(empty, empty_states, empty_pooled)
    assert empty.context.abs().mean() > 0.1 and empty.pooled.abs().mean() > 0.01


def test_sd_models_without_a_negative_prompt_use_the_empty_prompt_and_have_no_pooled_vector():
    pipe = random_pipeline(TINY)
    cond = encode_prompts(pipe, PROMPTS)
    assert cond.pooled is None
    assert torch.equal(negative_conditioning(pipe, None, cond, None).context, encode_prompts(pipe, ["", ""]).context)


def test_a_typed_exclamation_mark_is_open_clips_not_diffusers(pipe, reference):
    """A known difference: diffusers' tokenizer_2 has "!" as its pad token, so a typed "!" becomes
    id 0; minidream keeps the ordinary "!</w>" (id 256), as open_clip, sgm and ComfyUI do. CLIP-L
    (the first 32 channels here) agrees; bigG's states (the rest) and the pooled vector do not."""
    prompt = ["a dog!"]
    assert pipe.tokenizer_2(prompt)[0, 3] == 256
    assert reference.tokenizer_2(prompt, padding="max_length", max_length=77).input_ids[0][3] == 0
    with torch.no_grad():
        states, _, pooled, _ = reference.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    minidream = encode_prompts(pipe, prompt)
    width_1 = TINY_SDXL.text_encoder.width
    assert torch.equal(minidream.context[..., :width_1], states[..., :width_1])
    assert (minidream.context[..., width_1:] - states[..., width_1:]).abs().max() > 0.1
    assert relative_error(minidream.pooled, pooled) > 0.1


def test_clip_skip_counts_from_sdxls_penultimate_layer_as_diffusers_clip_skip_plus_one(tokenizer_folder):
    """minidream's clip_skip k (1 = SDXL's own layer) is diffusers' SDXL clip_skip k - 1: both
    encoders' hidden_states[-(k + 1)]. The pooled vector stays bigG's last layer. Four-layer
    encoders, so that k reaches 3 (diffusers' clip_skip 2)."""
    deeper = dataclasses.replace(TINY_SDXL.text_encoder, layers=4)
    config = dataclasses.replace(
        TINY_SDXL, text_encoder=deeper, text_encoder_2=dataclasses.replace(TINY_SDXL.text_encoder_2, layers=4)
    )
    pipe = listening_pipeline(config)
    reference = reference_of(pipe, tokenizer_folder)
    assert clip_skip_limit(config) == 3
    default = encode_prompts(pipe, PROMPTS)
    for k in (1, 2, 3):
        states, _, pooled, _ = diffusers_encode(reference, [NEGATIVE] * 2, clip_skip=k - 1)
        skipped = encode_prompts(pipe, PROMPTS, clip_skip=k)
        assert_conditioning_equal(skipped, states, pooled)
        assert torch.equal(skipped.pooled, default.pooled)
        assert k == 1 or (skipped.context - default.context).abs().max() > 0.1
    with pytest.raises(ValueError):
        encode_prompts(pipe, PROMPTS, clip_skip=4)


# ---- the sampling loop ---------------------------------------------------------------------------


def ours(pipe, negative, sampler="euler", seed=SEED, prompt=PROMPT, **options):
    images = generate(
        pipe, [prompt] * IMAGES, [seed + i for i in range(IMAGES)], None if negative is None else [negative] * IMAGES,
        steps=STEPS, sampler=sampler, height=HEIGHT, width=WIDTH, **options,
    )  # fmt: skip
    return [np.asarray(image) for image in images]


def theirs(reference, negative, sampler="euler", seed=SEED, guidance=5.0, eta=0.0, karras=False, **options):
    return reference_images(reference, PROMPT, negative, seed, IMAGES, STEPS, sampler, guidance, HEIGHT, WIDTH,
                            eta, karras, **options)  # fmt: skip


@pytest.mark.parametrize("negative", [NEGATIVE, None], ids=["negative", "no-negative"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_gives_diffusers_images(pipe, reference, sampler, negative):
    seed = 10 * SAMPLERS.index(sampler)
    got = ours(pipe, negative, sampler, seed)  # the family's guidance, 5.0 as diffusers' (theirs)
    assert got[0].shape == (HEIGHT, WIDTH, 3)
    assert max_difference(got, theirs(reference, negative, sampler, seed)) <= TOLERANCE
    assert all(image.std() > 10 for image in got)


# (sampler, negative prompt, options): karras sigmas, DDIM's noise, guidance 1 (both skip the
# unconditional half), guidance rescale, and an explicit empty negative prompt (encoded, not zeros).
VARIANTS = [
    ("dpmpp-2m", NEGATIVE, dict(karras=True)),
    ("ddim", NEGATIVE, dict(eta=1.0)),
    ("euler", NEGATIVE, dict(guidance=1.0)),
    ("euler", NEGATIVE, dict(guidance_rescale=0.7)),
    ("euler", "", {}),
]


@pytest.mark.parametrize("sampler, negative, options", VARIANTS,
                         ids=["dpmpp-2m-karras", "ddim-eta1", "guidance1", "rescale", "empty-negative"])
def test_sampler_options_give_diffusers_images(pipe, reference, sampler, negative, options):
    assert max_difference(ours(pipe, negative, sampler, **options), theirs(reference, negative, sampler, **options)) <= TOLERANCE


def test_ddim_reads_clip_sample_and_set_alpha_to_one_from_the_models_schedule(pipe, tokenizer_folder):
    """Both are False in SDXL's scheduler config; a config that sets them changes DDIM, as in diffusers."""
    schedule = dataclasses.replace(pipe.config.schedule, clip_sample=True, set_alpha_to_one=True)
    changed = dataclasses.replace(pipe, config=dataclasses.replace(pipe.config, schedule=schedule))  # the same modules
    reference = reference_of(changed, tokenizer_folder, {**SDXL_SCHEDULER, "clip_sample": True, "set_alpha_to_one": True})
    got = ours(changed, NEGATIVE, "ddim")
    assert max_difference(got, theirs(reference, NEGATIVE, "ddim")) <= TOLERANCE
    assert max_difference(got, ours(pipe, NEGATIVE, "ddim")) > 10 * TOLERANCE


def test_size_conditioning_gives_diffusers_images(pipe, reference):
    sizes = SizeConditioning(original_size=(128, 80), crop_top_left=(16, 8), target_size=(96, 64))
    got = ours(pipe, NEGATIVE, sizes=sizes)
    expected = theirs(reference, NEGATIVE, original_size=(128, 80), crops_coords_top_left=(16, 8), target_size=(96, 64))
    assert max_difference(got, expected) <= TOLERANCE
    # diffusers' defaults: original = target = the image's size, crop (0, 0)
    default = SizeConditioning(original_size=(HEIGHT, WIDTH), crop_top_left=(0, 0), target_size=(HEIGHT, WIDTH))
    assert max_difference(ours(pipe, NEGATIVE, sizes=default), ours(pipe, NEGATIVE)) == 0


def test_the_prompt_the_negative_prompt_and_the_sizes_change_the_image(pipe):
    """Guards the parity tests: each input they compare moves the image well beyond TOLERANCE."""
    base = ours(pipe, NEGATIVE)
    changed = {
        "prompt": ours(pipe, NEGATIVE, prompt="an oil painting of a lighthouse"),
        "no negative": ours(pipe, None),
        "empty negative": ours(pipe, ""),
        "sizes": ours(pipe, NEGATIVE, sizes=SizeConditioning((128, 80), (16, 8), (96, 64))),
    }
    for what, images in changed.items():
        assert max_difference(base, images) > 10 * TOLERANCE, what
    assert max_difference(changed["no negative"], changed["empty negative"]) > 10 * TOLERANCE


# ---- sample.py -----------------------------------------------------------------------------------


def test_the_defaults_follow_the_model_family(sample):
    """SDXL: 1024 x 1024, guidance 5.0 and diffusers' size conditioning (StableDiffusionXLPipeline's
    defaults); SD 1.x/2.x: 512 and 7.5 as before, and no size conditioning. 50 steps in both."""
    assert family_defaults(TINY_SDXL) == (1024, 5.0) and family_defaults(TINY) == (512, 7.5)
    for config, size, guidance, sizes in [(TINY_SDXL, 1024, 5.0, [1024, 1024]), (TINY, 512, 7.5, None)]:
        args = sample.parse_args(["--weights", "w", "--prompt", "a dog"])
        fill_model_defaults(args, config)
        assert (args.height, args.width, args.guidance, args.steps) == (size, size, guidance, 50)
        assert args.original_size == args.target_size == sizes
    given = sample.parse_args(["--weights", "w", "--prompt", "a dog", "--height", "768", "--guidance", "3",
                               "--original-size", "512", "640"])  # fmt: skip
    fill_model_defaults(given, TINY_SDXL)
    assert (given.height, given.width, given.guidance) == (768, 1024, 3.0)
    assert (given.original_size, given.crop_top_left, given.target_size) == ([512, 640], [0, 0], [768, 1024])


def test_the_png_text_names_the_sdxl_settings(sample):
    args = sample.parse_args(["--weights", "models/tiny-xl.safetensors", "--prompt", PROMPT, "--negative-prompt", "",
                              "--height", "64", "--crop-top-left", "16", "8", "--steps", "4"])  # fmt: skip
    fill_model_defaults(args, TINY_SDXL)
    assert parameters_text(args, PROMPT, 7, {}) == (
        f"{PROMPT}\nNegative prompt: \n"
        "Steps: 4, Sampler: DDIM, CFG scale: 5.0, Seed: 7, Size: 1024x64, Eta: 0.0, Original size: 1024x64, "
        "Crop top: 16, Crop left: 8, Target size: 1024x64, Empty negative prompt: encoded, Model: tiny-xl.safetensors"
    )


@pytest.mark.parametrize("flag", ["--original-size", "--crop-top-left", "--target-size"])
def test_size_conditioning_flags_are_refused_for_sd_models(sample, flag):
    args = sample.parse_args(["--weights", "w", "--prompt", "a dog", flag, "64", "64"])
    with pytest.raises(ValueError, match=f"{flag}: only SDXL models take size conditioning"):
        check_flags_fit(args, random_pipeline(TINY))
    check_flags_fit(args, random_pipeline(TINY_SDXL))


@pytest.mark.parametrize("args, message", [
    (["--original-size", "0", "64"], "--original-size 0 64: each value must be at least 1"),
    (["--crop-top-left", "-1", "0"], "--crop-top-left -1 0: each value must be at least 0"),
    (["--height", "0"], "--height and --width must be positive, got 0x(default)"),
], ids=["original-size", "crop", "height"])  # fmt: skip
def test_bad_size_flags_exit_2_in_one_line(sample, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args(["--weights", "w", "--prompt", "a dog", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_help_explains_the_size_conditioning_and_the_empty_negative_prompt(sample, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--original-size H W", "--crop-top-left TOP LEFT", "--target-size H W", "SDXL micro-conditioning",
                   'an explicit --negative-prompt "" is encoded', "A1111 zeroes it", "1024 for SDXL", "5.0 for SDXL"):
        assert phrase in text, phrase


def test_sample_py_gives_diffusers_images(sample, pipe, reference, tmp_path):
    """End to end through an SDXL single file (minidream.io's SDXL reading and writing): the size
    flags, no negative prompt (zeros), DPM++ 2M, the guidance left to the family's 5.0."""
    weights = tmp_path / "tiny-xl.safetensors"
    save_pipeline(pipe, weights, dtype=None)
    assert sample.main([
        "--weights", str(weights), "--prompt", PROMPT, "--seed", str(SEED), "--num-images", str(IMAGES),
        "--batch-size", str(IMAGES), "--steps", str(STEPS), "--sampler", "dpmpp-2m", "--height", str(HEIGHT),
        "--width", str(WIDTH), "--original-size", "128", "80", "--crop-top-left", "16", "8", "--dtype", "fp32",
        "--device", "cpu", "--out", str(tmp_path / "out"),
    ]) == 0  # fmt: skip
    expected = theirs(reference, None, "dpmpp-2m", original_size=(128, 80), crops_coords_top_left=(16, 8))
    assert max_difference(read_pngs(tmp_path / "out"), expected) <= TOLERANCE
    text = Image.open(tmp_path / "out" / f"00000-{SEED}.png").text["parameters"]
    assert "CFG scale: 5.0" in text and "Original size: 80x128, Crop top: 16, Crop left: 8, Target size: 96x64" in text
