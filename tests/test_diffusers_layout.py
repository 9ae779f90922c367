"""The diffusers key map and config translation, against diffusers' own models (built on the
meta device: names and shapes without weights, so the full-size checks cost nothing)."""

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from reference_models import SD15_UNET_CONFIG, SD15_VAE_CONFIG

from minidream.config import TINY, UNetConfig, VAEConfig
from minidream.io.diffusers_layout import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)
from minidream.models.unet import UNet
from minidream.models.vae import AutoencoderKL

# stabilityai/stable-diffusion-2-1's unet/config.json, as published.
SD21_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.10.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
    "upcast_attention": True,
}
SD2_UNET = UNetConfig(head_dim=64, context_dim=1024, use_linear_proj=True, upcast_attention=True)
TINY_MIXED_UNET = dataclasses.replace(TINY.unet, channel_mult=(1, 2, 2), attention_levels=(1,), transformer_depth=2)

UNET_CONFIGS = [UNetConfig(), SD2_UNET, TINY.unet, TINY_MIXED_UNET]
VAE_CONFIGS = [VAEConfig(), TINY.vae]


def meta_state(model_class, *args):
    with torch.device("meta"):
        return model_class(*args).state_dict()


@pytest.mark.parametrize("cfg", UNET_CONFIGS, ids=["sd15", "sd2", "tiny", "tiny-mixed"])
def test_unet_key_map_is_a_bijection_onto_diffusers_names_and_shapes(cfg):
    ours = meta_state(UNet, cfg)
    theirs = meta_state(UNet2DConditionModel.from_config, unet_config_to_diffusers(cfg))
    converted = unet_to_diffusers(ours, cfg)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.items()}
    back = unet_from_diffusers(converted, cfg)
    assert back.keys() == ours.keys() and all(back[k] is ours[k] for k in ours)


@pytest.mark.parametrize("cfg", VAE_CONFIGS, ids=["sd15", "tiny"])
def test_vae_key_map_is_a_bijection_onto_diffusers_names_and_shapes(cfg):
    ours = meta_state(AutoencoderKL, cfg)
    theirs = meta_state(DiffusersAutoencoderKL.from_config, vae_config_to_diffusers(cfg))
    converted = vae_to_diffusers(ours, cfg)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.items()}
    back = vae_from_diffusers(converted, cfg)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}


def test_vae_attention_1x1_convs_become_linears_with_the_same_values():
    ours = {k: torch.randn(v.shape) for k, v in meta_state(AutoencoderKL, TINY.vae).items()}
    converted = vae_to_diffusers(ours, TINY.vae)
    conv = ours["decoder.mid.attn_1.proj_out.weight"]  # C x C x 1 x 1
    linear = converted["decoder.mid_block.attentions.0.to_out.0.weight"]  # C x C
    assert conv.shape[2:] == (1, 1) and torch.equal(linear, conv[:, :, 0, 0])
    back = vae_from_diffusers(converted, TINY.vae)
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_keys_the_table_does_not_know_pass_through_for_the_loader_to_name():
    """Renaming checks nothing (the loader checks once, tensor_files.check_tensors): unknown keys
    keep their names, so a bad file's error names them as the file spells them."""
    state = dict(meta_state(UNet, TINY.unet))
    state["input_blocks.1.0.extra.weight"] = torch.zeros(1)
    converted = unet_to_diffusers(state, TINY.unet)
    assert converted["input_blocks.1.0.extra.weight"] is state["input_blocks.1.0.extra.weight"]
    assert "conv_in.weight" in converted and "input_blocks.0.0.weight" not in converted


def test_the_published_sd_configs_read_as_minidream_configs():
    assert unet_config_from_diffusers(SD15_UNET_CONFIG) == UNetConfig()
    assert unet_config_from_diffusers(SD21_UNET_CONFIG) == SD2_UNET
    assert vae_config_from_diffusers(SD15_VAE_CONFIG) == VAEConfig()
    # Written back, every published field keeps its value (bookkeeping aside).
    written = unet_config_to_diffusers(UNetConfig())
    assert all(written[k] == v for k, v in SD15_UNET_CONFIG.items() if k != "_diffusers_version")
    written = vae_config_to_diffusers(VAEConfig())
    assert all(written[k] == v for k, v in SD15_VAE_CONFIG.items() if k != "_diffusers_version")


@pytest.mark.parametrize("cfg", UNET_CONFIGS, ids=["sd15", "sd2", "tiny", "tiny-mixed"])
def test_unet_config_round_trips_through_a_diffusers_model(cfg):
    # A diffusers model's config holds every field it knows, defaults included, as saved files do.
    with torch.device("meta"):
        saved = dict(UNet2DConditionModel.from_config(unet_config_to_diffusers(cfg)).config)
    assert unet_config_from_diffusers(saved) == cfg


@pytest.mark.parametrize("cfg", VAE_CONFIGS, ids=["sd15", "tiny"])
def test_vae_config_round_trips_through_a_diffusers_model(cfg):
    with torch.device("meta"):
        saved = dict(DiffusersAutoencoderKL.from_config(vae_config_to_diffusers(cfg)).config)
    assert vae_config_from_diffusers(saved) == cfg


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"some_future_option": 1}, "some_future_option"),
        ({"up_block_types": ["UpBlock2D"] * 4}, "block types"),
        ({"attention_head_dim": [5, 10, 10, 20]}, "neither one head count nor one head size"),
    ],
)
def test_unet_configs_minidream_would_compute_differently_are_refused(change, problem):
    with pytest.raises(ValueError, match=problem):
        unet_config_from_diffusers({**SD15_UNET_CONFIG, **change})


def test_vae_configs_minidream_would_compute_differently_are_refused():
    with pytest.raises(ValueError, match="use_quant_conv"):
        vae_config_from_diffusers({**SD15_VAE_CONFIG, "use_quant_conv": False})
    with pytest.raises(ValueError, match="latent_channels"):
        vae_config_from_diffusers({k: v for k, v in SD15_VAE_CONFIG.items() if k != "latent_channels"})
    with pytest.raises(ValueError, match="eps"):
        vae_config_to_diffusers(dataclasses.replace(VAEConfig(), norm_eps=1e-5))
    # three levels downsample 4x: the size rule and the samplers assume SD's 8x (config.PIXELS_PER_LATENT)
    three_levels = {**SD15_VAE_CONFIG, "block_out_channels": [128, 256, 512], "down_block_types": ["DownEncoderBlock2D"] * 3,
                    "up_block_types": ["UpDecoderBlock2D"] * 3}
    with pytest.raises(ValueError, match=r"unsupported VAE: 3 levels downsample 4x; SD's VAEs have 4 levels \(8x\)"):
        vae_config_from_diffusers(three_levels)
