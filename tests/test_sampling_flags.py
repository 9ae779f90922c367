"""sample.py and python -m minidream.evaluate share one set of sampling flags (sampling_flags.py):
the same flags parse to the same settings, reach `generate`, and are refused the same way."""

import numpy as np
import pytest
from sample_runs import max_difference, one_torch_thread

from minidream import evaluate
from minidream.config import TINY
from minidream.diffusion.sampling import generate
from minidream.models.pipeline import random_pipeline
from minidream.sampling_flags import Sampling, draw, sampling_of

FLAGS = ["--steps", "3", "--sampler", "dpmpp-2m", "--karras", "--guidance", "5", "--guidance-rescale", "0.7",
         "--clip-skip", "2", "--height", "32", "--width", "48", "--negative-prompt", "blurry", "--batch-size", "2"]
EXPECTED = Sampling(steps=3, sampler="dpmpp-2m", guidance=5.0, karras=True, guidance_rescale=0.7, clip_skip=2,
                    height=32, width=48, negative_prompt="blurry", batch_size=2)
EVALUATE_REQUIRED = ["--weights", "w", "--subject-dir", "s", "--class-noun", "dog", "--clip", "c", "--dino", "d",
                     "--out", "o"]


def test_both_commands_parse_the_flags_to_the_same_settings(sample):
    assert sampling_of(sample.parse_args(["--weights", "w", "--prompt", "a dog", *FLAGS])) == EXPECTED
    assert sampling_of(evaluate.parse_args([*EVALUATE_REQUIRED, *FLAGS])) == EXPECTED


@pytest.mark.parametrize("args, message", [
    (["--guidance-rescale", "1.5"], "--guidance-rescale must be in [0, 1], got 1.5"),
    (["--clip-skip", "0"], "--clip-skip must be at least 1, got 0"),
    (["--sampler", "ddim", "--karras"], "karras sigmas apply only to the euler, heun, lms, dpmpp-2m, dpmpp-2m-sde, unipc samplers, not ddim"),
], ids=["rescale", "clip-skip", "karras"])
def test_evaluate_refuses_what_sample_refuses(sample, capsys, args, message):
    for parse in (lambda: sample.parse_args(["--weights", "w", "--prompt", "a dog", *args]),
                  lambda: evaluate.parse_args([*EVALUATE_REQUIRED, *args])):
        with pytest.raises(SystemExit) as exit_info:
            parse()
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err.splitlines()[-1]


def test_draw_passes_guidance_rescale_and_clip_skip_to_generate():
    pipe = random_pipeline(TINY, seed=0)
    prompts, seeds = ["a photo of sks dog", "a red car"], [4, 5]
    with one_torch_thread():
        drawn = draw(pipe, prompts, seeds, EXPECTED)
        direct = generate(pipe, prompts, seeds, negative_prompts=["blurry"] * 2, steps=3, sampler="dpmpp-2m",
                          guidance=5.0, height=32, width=48, karras=True, guidance_rescale=0.7, clip_skip=2)
        plain = draw(pipe, prompts, seeds, Sampling(**{**EXPECTED.__dict__, "guidance_rescale": 0.0, "clip_skip": None}))
    drawn, direct, plain = ([np.asarray(image) for image in images] for images in (drawn, direct, plain))
    assert max_difference(drawn, direct) == 0
    assert max_difference(drawn, plain) > 0  # the two options change the image
