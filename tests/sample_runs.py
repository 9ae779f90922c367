"""What the sampling tests share: a tiny random SD pipeline built and saved by diffusers itself,
sample.py run in-process, and diffusers' StableDiffusionPipeline run the way users run it."""

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.schedulers import scheduling_lms_discrete
from PIL import Image
from reference_models import seeded_diffusers_model
from transformers import CLIPTextConfig, CLIPTextModel
from transformers import CLIPTokenizer as TransformersCLIPTokenizer

from bench.schedulers import GaussLegendre20, lms_integrator_missing, scheduler_from_config
from minidream.config import TINY
from minidream.io.diffusers_layout import (
    unet_config_to_diffusers,
    vae_config_to_diffusers,
)
from minidream.models.tokenizer import CLIPTokenizer

REPO = Path(__file__).resolve().parents[1]
# The marks of every file that runs diffusers' schedulers: their numpy-2 __array__ warning is not
# ours to fix, and their LMS needs an integrator without scipy (conftest.lms_quadrature).
DIFFUSERS_SCHEDULER_MARKS = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.usefixtures("lms_quadrature"),
]

# stable-diffusion-v1-5's scheduler settings (its scheduler_config.json, less the PNDM-only keys).
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, steps_offset=1, clip_sample=False, trained_betas=None,
)
# The tiny CLIP text tower of minidream's TINY config, in transformers' terms.
TINY_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch's CPU kernels on one thread, then restore the count.

    On these shared 2-core machines a second thread mostly spin-waits: measured, a tiny 3x3
    conv took 7.5 ms with 2 threads and 0.14 ms with 1, and the SD 1.5-shaped 256x256 test
    43 s instead of about 110 s. The results are the same either way.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_sample_script():
    """sample.py (at the repository root, not in the package) as a module, for `main(argv)`."""
    spec = importlib.util.spec_from_file_location("sample", REPO / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_diffusers_pipeline(folder: Path, seed: int = 0) -> Path:
    """A tiny random StableDiffusionPipeline (DDIM, SD 1.5's schedule) written by save_pretrained.

    Random tiny models barely listen to the prompt, which would let a prompt, negative-prompt
    or guidance mistake pass a pixel comparison: the cross-attention output is scaled up so
    that changing the prompt visibly changes the image.
    """
    CLIPTokenizer().save_folder(folder.parent / f"{folder.name}-tokenizer")
    unet = seeded_diffusers_model(UNet2DConditionModel, unet_config_to_diffusers(TINY.unet), seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if ".attn2.to_out." in name:
                param.mul_(4.0)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER)).eval()
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=seeded_diffusers_model(AutoencoderKL, vae_config_to_diffusers(TINY.vae), seed + 1),
        text_encoder=text_encoder,
        tokenizer=TransformersCLIPTokenizer.from_pretrained(folder.parent / f"{folder.name}-tokenizer"),
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def load_reference(folder: Path) -> StableDiffusionPipeline:
    """diffusers' pipeline read back from the folder, as a user loads it.

    (Not the in-memory object that wrote it: a scheduler built in memory remembers which of its
    settings were defaults and `XScheduler.from_config` drops those, so Euler ancestral made from
    it would use its own default "linspace" spacing instead of the folder's "leading".)
    """
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def use_lms_quadrature(monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers' LMSDiscreteScheduler integrates with scipy when it is installed, else with GaussLegendre20."""
    if lms_integrator_missing():
        monkeypatch.setattr(scheduling_lms_discrete, "integrate", GaussLegendre20, raising=False)


def reference_scheduler(pipe: StableDiffusionPipeline, sampler: str, karras: bool = False):
    """The diffusers scheduler of a sample.py sampler, made as users make it: from_config."""
    return scheduler_from_config(pipe.scheduler.config, sampler, karras)


def reference_images(
    pipe: StableDiffusionPipeline, prompt: str, negative_prompt: str, seed: int, num_images: int, steps: int,
    sampler: str, guidance: float, height: int, width: int, eta: float = 0.0, karras: bool = False,
    **pipeline_options: float,
) -> list[np.ndarray]:
    """diffusers' images, one generator per image seeded seed + i (DESIGN.md, same seed same image);
    `pipeline_options` go to the pipeline call as they are (guidance_rescale, clip_skip)."""
    # The folder's scheduler goes back afterwards: from_config on a scheduler another test put
    # there would carry its settings (use_karras_sigmas, solver_order, ...) into the next.
    folder_scheduler, pipe.scheduler = pipe.scheduler, reference_scheduler(pipe, sampler, karras)
    try:
        images = pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)],
            num_inference_steps=steps,
            guidance_scale=guidance,
            eta=eta,  # the pipeline passes it to schedulers whose step() takes it: DDIM only
            height=height,
            width=width,
            **pipeline_options,
        ).images
    finally:
        pipe.scheduler = folder_scheduler
    return [np.asarray(image) for image in images]


def read_pngs(folder: Path) -> list[np.ndarray]:
    """The images sample.py wrote, in file-name order."""
    return [np.asarray(Image.open(path)) for path in sorted(folder.glob("*.png"))]


def max_difference(ours: list[np.ndarray], theirs: list[np.ndarray]) -> int:
    """The largest difference of any pixel channel, in 8-bit levels (1 = 1/255)."""
    assert len(ours) == len(theirs)
    assert all(a.shape == b.shape for a, b in zip(ours, theirs))
    return max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(ours, theirs))
