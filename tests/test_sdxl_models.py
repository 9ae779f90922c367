"""SDXL's models at TINY_SDXL (SDXL's layout at a few hundred thousand parameters) against
diffusers and transformers on the same weights: the UNet with its vector conditioning y, both
text encoders and the pooled projection, and what the presets say. The full SDXL shapes are in
tests/test_sdxl_shapes.py."""

import dataclasses

import pytest
import torch
from reference_models import REL_TOL, relative_error, unet_inputs
from sdxl_reference import bigg, clip_l, diffusers_unet, spread_weights

from minidream.config import SDXL, TINY_SDXL
from minidream.io.diffusers_layout import unet_config_from_diffusers, unet_config_to_diffusers, unet_to_diffusers
from minidream.models.open_clip_text import OpenCLIPTextModel
from minidream.models.pipeline import random_pipeline
from minidream.models.unet import UNet, size_conditioning

PROMPTS = ["a photo of sks dog on the beach", "a castle, trending on artstation", ""]


@pytest.fixture(scope="module")
def pipe():
    return spread_weights(random_pipeline(TINY_SDXL, seed=0))


def size_ids(batch: int) -> torch.Tensor:
    """Distinct original sizes, crops and targets per row: (orig h, w, crop top, left, target h, w)."""
    rows = [[1024, 768, 0, 0, 1024, 1024], [512, 896, 32, 64, 768, 1344], [96, 64, 8, 0, 64, 96]]
    return torch.tensor(rows[:batch], dtype=torch.float32)


def inputs(pipe, batch: int = 3):
    cfg = pipe.config.unet
    x, t, context = unet_inputs(cfg, [0, 261.5, 999][:batch], height=16, width=8, seed=1)
    pooled = torch.randn(batch, pipe.config.text_encoder_2.width, generator=torch.Generator().manual_seed(2))
    return x, t, context, pooled, size_ids(batch)


def test_unet_with_y_matches_diffusers_text_time_and_its_gradients(pipe):
    """y = [pooled, Fourier(size ids)] through label_emb equals diffusers' add_time_proj and
    add_embedding (addition_embed_type "text_time"), forward and backward."""
    unet, reference = pipe.unet, diffusers_unet(pipe)
    x, t, context, pooled, ids = inputs(pipe)
    out = unet(x, t, context, size_conditioning(pooled, ids, pipe.config.unet.size_embed_dim))
    expected = reference(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    assert relative_error(out, expected) <= 1e-6

    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    grads = unet_to_diffusers({name: p.grad for name, p in unet.named_parameters()}, pipe.config.unet)
    for name, param in reference.named_parameters():
        assert relative_error(grads[name], param.grad) <= REL_TOL, name
    unet.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_unet_matches_diffusers_bit_for_bit(pipe, dtype):
    unet = UNet(TINY_SDXL.unet)
    unet.load_state_dict(pipe.unet.state_dict())
    reference = diffusers_unet(pipe).to(dtype)
    x, t, context, pooled, ids = inputs(pipe, batch=2)
    with torch.no_grad():
        expected = reference(
            x.to(dtype), t, context.to(dtype), added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": ids}
        ).sample
        y = size_conditioning(pooled.to(dtype), ids, TINY_SDXL.unet.size_embed_dim)
        out = unet.to(dtype)(x.to(dtype), t, context.to(dtype), y)
    assert out.dtype == dtype and torch.equal(out, expected)


def test_the_unet_asks_for_y_exactly_when_it_has_label_emb(pipe):
    x, t, context, pooled, ids = inputs(pipe, batch=1)
    with pytest.raises(ValueError, match="needs the vector conditioning y"):
        pipe.unet(x, t, context)
    sd_unet = UNet(dataclasses.replace(TINY_SDXL.unet, adm_in_channels=None))
    with pytest.raises(ValueError, match="takes no y"):
        sd_unet(x, t, context, size_conditioning(pooled, ids, 8))


def test_size_features_are_cos_then_sin_of_each_id_in_order():
    """Podell et al. sec. 2.2: six ids, each embedded alone; sgm and diffusers put cos first."""
    pooled = torch.zeros(1, 2)
    y = size_conditioning(pooled, torch.tensor([[3.0, 0, 0, 0, 0, 0]]), 4)
    frequencies = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(2) / 2)
    expected_first = torch.cat([torch.cos(3 * frequencies), torch.sin(3 * frequencies)])
    assert y.shape == (1, 2 + 6 * 4)
    assert torch.allclose(y[0, 2:6], expected_first) and torch.equal(y[0, 6:10], torch.tensor([1.0, 1, 0, 0]))


def test_both_text_encoders_give_diffusers_penultimate_states_and_pooled_projection(pipe):
    """CLIP-L's hidden_states[-2] and bigG's, neither layer-normed (sgm legacy=False), and
    bigG's pooled output: ln_final of the last layer at EOS, times text_projection."""
    ids = pipe.tokenizer(PROMPTS)
    ids_2 = pipe.tokenizer_2(PROMPTS)
    with torch.no_grad():
        expected_l = clip_l(pipe)(ids, output_hidden_states=True).hidden_states[-2]
        reference_g = bigg(pipe)(ids_2, output_hidden_states=True)
        states_g, pooled = pipe.text_encoder_2.encode(ids_2)
        assert torch.equal(pipe.text_encoder(ids), expected_l)
        assert torch.equal(states_g, reference_g.hidden_states[-2])
        assert torch.equal(pipe.text_encoder_2(ids_2), states_g)
    assert relative_error(pooled, reference_g.text_embeds) <= 1e-6


def test_the_pooled_projection_is_applied_as_x_times_p_as_sai_files_store_it(pipe):
    """The SAI file's text_projection P is used as x @ P (diffusers' Linear holds P^T)."""
    encoder = pipe.text_encoder_2
    ids = pipe.tokenizer_2(PROMPTS[:1])
    with torch.no_grad():
        _, pooled = encoder.encode(ids)
        projection = encoder.text_projection.clone()
        encoder.text_projection.copy_(projection.T)
        _, transposed = encoder.encode(ids)
        encoder.text_projection.copy_(projection)
    assert relative_error(transposed, pooled) > 0.1


def test_bigg_pads_with_zero_and_keeps_a_typed_exclamation_mark(pipe):
    """open_clip, sgm and ComfyUI: pads are id 0, and "!" in a prompt is "!</w>" (256)."""
    ids = pipe.tokenizer_2(["a dog!"])[0].tolist()
    assert ids[:5] == [49406, 320, 1929, 256, 49407] and set(ids[5:]) == {0}
    assert pipe.tokenizer(["a dog!"])[0].tolist()[5:] == [49407] * 72  # CLIP-L pads with EOS


def test_sdxl_preset_has_sdxl_base_parameter_counts():
    with torch.device("meta"):
        pipe = random_pipeline(SDXL)
    assert sum(p.numel() for p in pipe.unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in pipe.text_encoder.parameters()) == 123_060_480
    bigg_params = sum(p.numel() for p in pipe.text_encoder_2.parameters()) + pipe.text_encoder_2.text_projection.numel()
    assert bigg_params == 694_659_840
    assert isinstance(pipe.text_encoder_2, OpenCLIPTextModel) and pipe.config.vae.scaling_factor == 0.13025


def test_sdxl_unet_config_reads_back_from_its_diffusers_config_json():
    """The published SDXL base unet/config.json fields that differ from SD's."""
    written = unet_config_to_diffusers(SDXL.unet, sample_size=128)
    assert written["attention_head_dim"] == [5, 10, 20]
    assert written["transformer_layers_per_block"] == [1, 2, 10]
    assert written["addition_embed_type"] == "text_time" and written["addition_time_embed_dim"] == 256
    assert written["projection_class_embeddings_input_dim"] == 2816
    assert written["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet_config_from_diffusers(written) == SDXL.unet


def test_an_odd_latent_size_upsamples_to_each_skip_as_diffusers_does(pipe):
    """A 1000 x 1000 px SDXL image is a 125 x 125 latent: odd at every level. diffusers takes it
    (upsample_size); so does minidream's UNet, here at 11 x 13 on the tiny model."""
    x, t, context, pooled, ids = inputs(pipe, batch=2)
    x = torch.randn(2, 4, 11, 13, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = pipe.unet(x, t, context, size_conditioning(pooled, ids, pipe.config.unet.size_embed_dim))
        expected = diffusers_unet(pipe)(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    assert out.shape == x.shape and relative_error(out, expected) <= 1e-6
