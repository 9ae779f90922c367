"""Checkpoint round trips at the full SD 1.5 shapes (random weights), against diffusers itself:
a folder written by diffusers' save_pretrained, minidream's single file read by diffusers' own
single-file converters, and a Lightning-style `.ckpt`. Each big file is made once per module."""

import dataclasses
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from pipeline_checks import assert_same_weights
from reference_models import (
    REL_TOL,
    SD15_UNET_CONFIG,
    SD15_VAE_CONFIG,
    relative_error,
    seeded_diffusers_model,
)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel
from transformers import CLIPTokenizer as TransformersCLIPTokenizer

from minidream import load_pipeline, save_pipeline
from minidream.config import SD15
from minidream.io.diffusers_layout import unet_to_diffusers, vae_to_diffusers
from minidream.models.tokenizer import CLIPTokenizer

pytestmark = pytest.mark.sd_shapes  # full SD 1.5 shapes: `-m "not sd_shapes"` leaves them out of a quick run

# stable-diffusion-v1-5's text_encoder/config.json and scheduler/scheduler_config.json, as published.
SD15_TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
    pad_token_id=1, projection_dim=768,
)
SD15_SCHEDULER_CONFIG = dict(
    beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None, clip_sample=False,
)


def seeded_text_encoder(seed: int) -> CLIPTextModel:
    """transformers' CLIP text model, random, with every norm weight and bias made distinct."""
    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory) -> Iterator[Path]:
    """A random SD 1.5-shaped fp16 pipeline, written by diffusers' own save_pretrained."""
    root = tmp_path_factory.mktemp("sd15")
    CLIPTokenizer().save_folder(root / "tokenizer-source")
    pipe = StableDiffusionPipeline(
        unet=seeded_diffusers_model(UNet2DConditionModel, SD15_UNET_CONFIG, 0).half(),
        vae=seeded_diffusers_model(DiffusersAutoencoderKL, SD15_VAE_CONFIG, 1).half(),
        text_encoder=seeded_text_encoder(2).half(),
        tokenizer=TransformersCLIPTokenizer.from_pretrained(root / "tokenizer-source"),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root / "diffusers")
    del pipe
    yield root / "diffusers"
    shutil.rmtree(root)  # 4 GB with the single file: gone before the next module's files are made


@pytest.fixture(scope="module")
def sd15_single_file(sd15_folder) -> Path:
    """minidream's single-file export (fp16, the default) of the diffusers folder."""
    path = sd15_folder.parent / "sd15.safetensors"
    save_pipeline(load_pipeline(sd15_folder), path)
    return path


def assert_equal_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and torch.equal(actual[key], tensor), key


def without_text_model_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 names CLIPTextModel's tensors without the `text_model.` prefix."""
    return {key.removeprefix("text_model."): tensor for key, tensor in tensors.items()}


def test_diffusers_folder_to_minidream_to_single_file_to_minidream_is_bit_identical(sd15_folder, sd15_single_file):
    first = load_pipeline(sd15_folder)
    # Including the SD 1.5 PNDM scheduler config read as SD's schedule. diffusers' save_pretrained
    # writes PNDM's default spacing ("leading") into it, where SD's own release config names none (SD15):
    # minidream reads what the folder says, as diffusers' Scheduler.from_config would.
    said = dataclasses.replace(SD15.schedule, timestep_spacing="leading")
    assert first.config == dataclasses.replace(SD15, schedule=said)
    assert first.dtype == torch.float16
    # What minidream holds is what diffusers wrote, tensor for tensor.
    assert_equal_tensors(unet_to_diffusers(first.unet.state_dict(), SD15.unet),
                         load_file(sd15_folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert_equal_tensors(vae_to_diffusers(first.vae.state_dict(), SD15.vae),
                         load_file(sd15_folder / "vae" / "diffusion_pytorch_model.safetensors"))
    assert_equal_tensors(without_text_model_prefix(first.text_encoder.state_dict()),
                         load_file(sd15_folder / "text_encoder" / "model.safetensors"))

    second = load_pipeline(sd15_single_file)
    assert second.config == first.config
    assert_same_weights(second, first)


@pytest.fixture(scope="module")
def converted_by_diffusers(sd15_single_file) -> dict[str, dict[str, torch.Tensor]]:
    """minidream's single file through diffusers' LDM-to-diffusers converters."""
    checkpoint = load_file(sd15_single_file)
    return {
        "unet": convert_ldm_unet_checkpoint(checkpoint, SD15_UNET_CONFIG),
        "vae": convert_ldm_vae_checkpoint(checkpoint, SD15_VAE_CONFIG),
        "text_encoder": without_text_model_prefix(convert_ldm_clip_checkpoint(checkpoint)),
    }


@pytest.mark.parametrize("part, weights_file", [
    ("unet", "unet/diffusion_pytorch_model.safetensors"),
    ("vae", "vae/diffusion_pytorch_model.safetensors"),
    ("text_encoder", "text_encoder/model.safetensors"),
])
def test_diffusers_converters_recover_exactly_the_tensors_diffusers_saved(
    converted_by_diffusers, sd15_folder, part, weights_file
):
    assert_equal_tensors(converted_by_diffusers[part], load_file(sd15_folder / weights_file))


def diffusers_model(part: str, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The diffusers/transformers model of `part` holding `tensors`, in fp32."""
    if part == "text_encoder":  # small; built normally so its position_ids buffer exists
        model = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
        model.load_state_dict(tensors, strict=True)
        return model.float().eval()
    model_class, config = {
        "unet": (UNet2DConditionModel, SD15_UNET_CONFIG), "vae": (DiffusersAutoencoderKL, SD15_VAE_CONFIG)
    }[part]
    with torch.device("meta"):
        model = model_class.from_config(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.float().eval()


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
@torch.no_grad()
def test_converted_diffusers_models_compute_what_minidream_computes(converted_by_diffusers, sd15_single_file, part):
    """One part at a time, in fp32, so that at most two UNets are in memory."""
    reference = diffusers_model(part, converted_by_diffusers[part])
    ours = getattr(load_pipeline(sd15_single_file), part).float().eval()
    generator = torch.Generator().manual_seed(0)
    if part == "unet":
        x, context = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 768, generator=generator)
        t = torch.tensor([500])
        expected, actual = reference(x, t, context).sample, ours(x, t, context)
    elif part == "vae":
        z = torch.randn(1, 4, 8, 8, generator=generator)
        expected, actual = reference.decode(z).sample, ours.decode(z)
    else:
        ids = CLIPTokenizer()(["a photo of sks dog in a bucket"])
        expected, actual = reference(ids).last_hidden_state, ours(ids)
    assert relative_error(actual, expected) <= REL_TOL


def test_lightning_ckpt_loads_weights_only_and_matches_the_safetensors(sd15_single_file, tmp_path, monkeypatch):
    """The original SD releases are PyTorch Lightning checkpoints: `state_dict` beside Lightning's
    ModelCheckpoint class and numpy scalars. They load with weights_only, without Lightning."""
    lightning = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    lightning.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": lightning.__name__})
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, lightning.__name__, lightning)
    path = tmp_path / "sd-v1-x.ckpt"
    torch.save({
        "epoch": 6,
        "global_step": np.int64(470000),
        "pytorch-lightning_version": "1.4.2",
        "callbacks": {lightning.ModelCheckpoint: {"best_model_score": None, "current_score": np.float64(0.5)}},
        "state_dict": load_file(sd15_single_file),
    }, path)
    monkeypatch.undo()  # Lightning is gone again, as on a user's machine
    assert "pytorch_lightning" not in sys.modules

    assert_same_weights(load_pipeline(path), load_pipeline(sd15_single_file))
