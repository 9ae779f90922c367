"""SD 2.x's OpenCLIP text tower (models/open_clip_text.py) equals transformers' CLIPTextModel in
SD 2.x's text_encoder/config.json, given the same weights through io/open_clip_layout.py's
table; and that table equals diffusers' `convert_open_clip_checkpoint`, tensor for tensor.

The full ViT-H/14 case holds ~340M parameters twice (~3 GiB); it is marked sd_shapes.
"""

import dataclasses

import pytest
import torch
import transformers
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from test_clip import random_state_dict

from minidream.config import SD21, TINY_SD2, TextEncoderConfig
from minidream.io import open_clip_layout
from minidream.models.clip import CLIPTextModel
from minidream.models.open_clip_text import OpenCLIPTextModel
from minidream.models.tokenizer import CLIPTokenizer

SD2_PREFIX = "cond_stage_model.model."
PROMPTS = ["a photo of sks dog", "(masterpiece:1.2), a castle on a hill at sunset, trending on artstation, 8k", ""]
TOLERANCE = 1e-5  # max |ours - reference| / max |reference|, fp32


def sd2_reference_config(cfg: TextEncoderConfig) -> transformers.CLIPTextConfig:
    """stabilityai/stable-diffusion-2-1's text_encoder/config.json, at cfg's sizes: 23 of the
    24 resblocks, exact GELU, SD 2's legacy special ids (bos 0, eos 2, pad 1)."""
    return transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers - 1,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.context_length,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=512,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        attn_implementation="eager",
    )


def random_open_clip_state(cfg: TextEncoderConfig, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor random, scaled so each attention and MLP output matters (test_clip's scaling)."""
    with torch.device("meta"):
        shapes = OpenCLIPTextModel(cfg)
    return random_state_dict(shapes, seed)


def build_ours(cfg: TextEncoderConfig, state: dict[str, torch.Tensor]) -> OpenCLIPTextModel:
    with torch.device("meta"):
        model = OpenCLIPTextModel(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def build_reference(cfg: TextEncoderConfig, transformers_state: dict[str, torch.Tensor]) -> transformers.CLIPTextModel:
    reference = transformers.CLIPTextModel(sd2_reference_config(cfg)).eval()
    # transformers 5 names the modules without `text_model.`
    reference.load_state_dict({k.removeprefix("text_model."): v for k, v in transformers_state.items()}, strict=True)
    return reference


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def input_ids():
    """SD 2.x's padding: with id 0 ("!") after EOS."""
    return CLIPTokenizer(pad_token_id=0)(PROMPTS)


@pytest.fixture(scope="module", params=["tiny-sd2", pytest.param("sd21", marks=pytest.mark.sd_shapes)])
def pair(request):
    cfg = {"tiny-sd2": TINY_SD2, "sd21": SD21}[request.param].text_encoder
    state = random_open_clip_state(cfg, seed=0)
    ours = build_ours(cfg, state)
    reference = build_reference(cfg, open_clip_layout.to_transformers(state, cfg.layers))
    return cfg, state, ours, reference


def test_module_names_are_the_sd2_checkpoint_keys(pair):
    cfg, _, ours, _ = pair
    keys = set(ours.state_dict())
    assert "transformer.resblocks.0.attn.in_proj_weight" in keys
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection", "logit_scale"} <= keys
    assert f"transformer.resblocks.{cfg.layers - 1}.mlp.c_proj.bias" in keys
    # The two tensors SD never reads are buffers: in the file and the state dict, not trained.
    assert {name for name, _ in ours.named_buffers()} == {"text_projection", "logit_scale"}


def test_full_size_is_vit_h14(pair):
    cfg, _, ours, reference = pair
    if cfg == SD21.text_encoder:
        # ViT-H-14's text tower: 24 resblocks of 12,596,224 (in_proj 3,148,800, out_proj 1,049,600,
        # two norms 4,096, c_fc 4,198,400, c_proj 4,195,328), token embedding 49408 x 1024,
        # positions 77 x 1024, ln_final 2,048.
        assert sum(p.numel() for p in ours.parameters()) == 24 * 12_596_224 + 50_593_792 + 78_848 + 2_048
    last = ours.transformer.resblocks[-1]
    assert sum(p.numel() for p in ours.parameters()) - sum(p.numel() for p in last.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )


@torch.no_grad()
def test_states_match_transformers(pair, input_ids):
    cfg, _, ours, reference = pair
    ids = input_ids[:1] if cfg.width >= 1024 else input_ids  # full shapes: batch 1, lean
    expected = reference(ids, output_hidden_states=True)
    assert relative_error(ours(ids), expected.last_hidden_state) <= TOLERANCE
    # clip_skip=2 counts from SD 2's layer: one layer earlier, through ln_final.
    earlier = reference.final_layer_norm(expected.hidden_states[-2])
    assert relative_error(ours(ids, clip_skip=2), earlier) <= TOLERANCE
    assert relative_error(ours(ids, clip_skip=2), expected.last_hidden_state) > 0.1


def test_table_equals_diffusers_converter(pair):
    cfg, state, _, _ = pair
    checkpoint = {SD2_PREFIX + name: tensor for name, tensor in state.items()}
    checkpoint["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # the rest of a single file
    reference = transformers.CLIPTextModel(sd2_reference_config(cfg)) if cfg.width < 1024 else None
    if reference is None:  # the converter reads only text_model.config: spare the full model
        reference = type("Stub", (), {"config": sd2_reference_config(cfg)})()
    theirs = convert_open_clip_checkpoint(reference, checkpoint)
    ours = open_clip_layout.to_transformers(state, cfg.layers)
    assert set(theirs) == set(ours)
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_table_inverts():
    cfg = TINY_SD2.text_encoder
    state = random_open_clip_state(cfg, seed=1)
    back = open_clip_layout.to_open_clip(open_clip_layout.to_transformers(state, cfg.layers), cfg.layers - 1)
    dropped = {*open_clip_layout.UNUSED, *(k for k in state if k.startswith(f"transformer.resblocks.{cfg.layers - 1}."))}
    assert set(back) == set(state) - dropped
    assert all(torch.equal(back[key], state[key]) for key in back)


@torch.no_grad()
def test_equals_minidreams_transformers_layout(input_ids):
    # The same states from the 23-layer CLIPTextModel a diffusers folder of SD 2.x loads into.
    cfg = TINY_SD2.text_encoder
    state = random_open_clip_state(cfg, seed=2)
    clip = CLIPTextModel(dataclasses.replace(cfg, layers=cfg.layers - 1, open_clip=False)).eval()
    clip.load_state_dict(open_clip_layout.to_transformers(state, cfg.layers), strict=True)
    ours = build_ours(cfg, state)
    for clip_skip in (1, 2, 3):
        assert relative_error(ours(input_ids, clip_skip=clip_skip), clip(input_ids, clip_skip=clip_skip)) <= TOLERANCE
    with pytest.raises(ValueError, match="clip_skip must be in 1..23"):
        ours(input_ids, clip_skip=24)
