"""The SD 2.1 presets are stabilityai/stable-diffusion-2-1(-base)'s configs, read through the
same converters that read a diffusers folder."""

import dataclasses

from test_diffusers_layout import SD21_UNET_CONFIG

from minidream.config import ARCHITECTURES, SD15, SD21, SD21_BASE, TINY_SD2
from minidream.io.diffusers_folder import (
    schedule_config_from_diffusers,
    text_encoder_config_from_transformers,
)
from minidream.io.diffusers_layout import unet_config_from_diffusers

# stabilityai/stable-diffusion-2-1's text_encoder/config.json (the fields minidream reads).
SD21_TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"], "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
    "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 16,
    "num_hidden_layers": 23, "vocab_size": 49408, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# scheduler/scheduler_config.json of 2-1 (768-v) and 2-1-base (512, epsilon).
SD21_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}
SD21_BASE_SCHEDULER_CONFIG = {**SD21_SCHEDULER_CONFIG, "_class_name": "PNDMScheduler", "prediction_type": "epsilon"}


def test_unet_is_sd21s():
    unet = unet_config_from_diffusers(SD21_UNET_CONFIG)
    assert SD21.unet == SD21_BASE.unet == unet
    # attention_head_dim [5, 10, 20, 20] is heads per level: 64 channels each.
    assert (unet.head_dim, unet.context_dim, unet.use_linear_proj) == (64, 1024, True)


def test_text_encoder_is_sd21s_penultimate_layer():
    # The diffusers folder's 23-layer transformers model is OpenCLIP's 24 resblocks less the last.
    transformers_layout = text_encoder_config_from_transformers(SD21_TEXT_ENCODER_CONFIG)
    assert dataclasses.replace(SD21.text_encoder, layers=23, open_clip=False) == transformers_layout
    assert SD21.text_encoder == SD21_BASE.text_encoder and SD21.text_encoder.open_clip


def test_schedules():
    assert SD21.schedule == schedule_config_from_diffusers(SD21_SCHEDULER_CONFIG)
    assert SD21_BASE.schedule == schedule_config_from_diffusers(SD21_BASE_SCHEDULER_CONFIG)
    assert SD21.schedule.prediction_type == "v_prediction" and SD21_BASE.schedule.prediction_type == "epsilon"
    assert SD21.vae == SD15.vae


def test_architecture_names():
    assert ARCHITECTURES["sd21"] is SD21 and ARCHITECTURES["sd21-base"] is SD21_BASE
    assert ARCHITECTURES["tiny-sd2"] is TINY_SD2
    assert TINY_SD2.text_encoder.layers == 24 and TINY_SD2.unet.use_linear_proj and TINY_SD2.unet.head_dim
