"""The CLIP text encoder equals transformers' CLIPTextModel given the same random weights."""

import dataclasses

import pytest
import torch
import transformers

from minidream.config import SD15, TINY, TextEncoderConfig
from minidream.models.clip import CLIPTextModel
from minidream.models.tokenizer import CLIPTokenizer

SD_PREFIX = "cond_stage_model.transformer."
PROMPTS = [
    "a photo of sks dog",
    "(masterpiece:1.2), best quality, a castle on a hill at sunset, trending on artstation, 8k",
    "",
]


def reference_model(cfg: TextEncoderConfig, eos_token_id: int) -> transformers.CLIPTextModel:
    config = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_width,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.context_length,
        hidden_act=cfg.activation,
        layer_norm_eps=cfg.layer_norm_eps,
        eos_token_id=eos_token_id,
        attn_implementation="eager",
    )
    return transformers.CLIPTextModel(config).eval()


def random_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random values for every parameter, scaled so that every attention and MLP output matters
    (unit-variance embeddings and projections, layer norms away from 1 and 0)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in model.state_dict().items():
        noise = torch.randn(param.shape, generator=generator)
        if name.endswith("embedding.weight") or name == "positional_embedding":  # (OpenCLIP's name)
            state[name] = noise
        elif param.ndim == 2:
            state[name] = noise / param.shape[1] ** 0.5
        elif ("layer_norm" in name or "ln_" in name) and name.endswith("weight"):
            state[name] = 1 + 0.2 * noise
        else:
            state[name] = 0.2 * noise
    return state


def build_on_meta(cfg: TextEncoderConfig, state: dict[str, torch.Tensor]) -> CLIPTextModel:
    """The way big models are loaded: no random init, the checkpoint tensors become the parameters."""
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    model.load_state_dict(state, assign=True)
    return model.eval()


def build_pair(cfg: TextEncoderConfig, seed: int, eos_token_id: int = 49407):
    """(ours, transformers') with the same weights; transformers 5 names them without `text_model.`."""
    with torch.device("meta"):
        shapes = CLIPTextModel(cfg)
    state = random_state_dict(shapes, seed)
    reference = reference_model(cfg, eos_token_id)
    reference.load_state_dict({name.removeprefix("text_model."): value for name, value in state.items()})
    return build_on_meta(cfg, state), reference


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def input_ids():
    """3 x 77 ids of prompts of different lengths, padded with EOS as SD 1.x does."""
    return CLIPTokenizer()(PROMPTS)


@pytest.fixture(scope="module", params=["tiny", "sd15"])
def model_pair(request):
    cfg = {"tiny": TINY, "sd15": SD15}[request.param].text_encoder
    return build_pair(cfg, seed=0)


def test_parameter_names_are_the_sd_checkpoint_names(model_pair):
    ours, reference = model_pair
    assert set(ours.state_dict()) == {"text_model." + name for name in reference.state_dict()}
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in ours.state_dict()
    assert list(ours.buffers()) == []  # nothing that a meta-device build would leave behind


@pytest.mark.sd_shapes
def test_full_size_is_vit_l14(model_pair):
    ours, reference = model_pair
    if ours.config == SD15.text_encoder:
        assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


@torch.no_grad()
def test_outputs_match_transformers(model_pair, input_ids):
    ours, reference = model_pair
    expected = reference(input_ids, output_hidden_states=True)
    hidden = ours(input_ids)
    assert max_relative_error(hidden, expected.last_hidden_state) <= 1e-5
    assert max_relative_error(ours.pooled(hidden, input_ids), expected.pooler_output) <= 1e-5
    # clip_skip=2: the penultimate layer's output through the final norm, as UIs compute it.
    penultimate = ours(input_ids, clip_skip=2)
    assert max_relative_error(penultimate, reference.final_layer_norm(expected.hidden_states[-2])) <= 1e-5
    assert max_relative_error(penultimate, hidden) > 0.1  # the last layer does change the output


@torch.no_grad()
def test_clip_skip_from_config(input_ids):
    cfg = TINY.text_encoder
    state = random_state_dict(CLIPTextModel(cfg), seed=1)
    skip_two = build_on_meta(dataclasses.replace(cfg, clip_skip=2), state)
    assert torch.equal(skip_two(input_ids), build_on_meta(cfg, state)(input_ids, clip_skip=2))
    with pytest.raises(ValueError, match="clip_skip must be in 1..2"):
        skip_two(input_ids, clip_skip=3)


@torch.no_grad()
@pytest.mark.parametrize("eos_token_id", [49407, 2])
def test_pooled_output_is_at_the_first_eos(input_ids, eos_token_id):
    # SD 1.x's text_encoder/config.json says eos_token_id=2, for which transformers pools at the
    # argmax id instead; both are the first EOS because EOS is the largest id.
    ours, reference = build_pair(TINY.text_encoder, seed=2, eos_token_id=eos_token_id)
    hidden = ours(input_ids)
    assert max_relative_error(ours.pooled(hidden, input_ids), reference(input_ids).pooler_output) <= 1e-5
    first_eos = [len(CLIPTokenizer().encode(p)) + 1 for p in PROMPTS]
    assert torch.equal(ours.pooled(hidden, input_ids), hidden[torch.arange(3), first_eos])


@torch.no_grad()
def test_gelu_variant_matches_transformers(input_ids):
    # The knob SD 2.x's OpenCLIP text encoder needs.
    ours, reference = build_pair(dataclasses.replace(TINY.text_encoder, activation="gelu"), seed=3)
    assert max_relative_error(ours(input_ids), reference(input_ids).last_hidden_state) <= 1e-5
    with pytest.raises(ValueError, match="unknown text encoder activation 'relu'"):
        CLIPTextModel(dataclasses.replace(TINY.text_encoder, activation="relu"))(input_ids)


@torch.no_grad()
def test_padding_does_not_change_the_prompt_positions(input_ids):
    ours, _ = build_pair(TINY.text_encoder, seed=4)
    zero_padded = CLIPTokenizer(pad_token_id=0)(PROMPTS)
    hidden, hidden_zero_padded = ours(input_ids), ours(zero_padded)
    for row, prompt in enumerate(PROMPTS):
        through_eos = len(CLIPTokenizer().encode(prompt)) + 2
        assert torch.equal(hidden[row, :through_eos], hidden_zero_padded[row, :through_eos])
        assert not torch.allclose(hidden[row, through_eos:], hidden_zero_padded[row, through_eos:])


@torch.no_grad()
@pytest.mark.parametrize("position_ids", [None, "int64", "float32"])
def test_sd_checkpoint_loads_by_prefix_strip(input_ids, position_ids):
    cfg = TINY.text_encoder
    source = build_on_meta(cfg, random_state_dict(CLIPTextModel(cfg), seed=5))
    checkpoint = {SD_PREFIX + name: value for name, value in source.state_dict().items()}
    checkpoint["model.diffusion_model.out.0.weight"] = torch.ones(3)  # other parts of the single file
    if position_ids is not None:
        # Stored by older transformers versions, in some checkpoints as floats.
        positions = torch.arange(77, dtype=getattr(torch, position_ids))[None]
        checkpoint[SD_PREFIX + "text_model.embeddings.position_ids"] = positions
    text_encoder_state = {k.removeprefix(SD_PREFIX): v for k, v in checkpoint.items() if k.startswith(SD_PREFIX)}

    with torch.device("meta"):
        loaded = CLIPTextModel(cfg)
    loaded.load_state_dict(text_encoder_state, strict=True, assign=True)
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.equal(loaded(input_ids), source(input_ids))
