"""SDXL base 1.0 at its full shapes (random weights) against diffusers and transformers:

- the UNet (2,567,463,684 parameters), whole, against diffusers' UNet2DConditionModel in
  `unet_config_to_diffusers(SDXL.unet)`: one forward of each at batch 2, a 16 x 12 latent (8 x 6
  and 4 x 3 at the attention levels), timesteps 1 and 998, with y. diffusers is given the pooled
  vector and the six size-and-crop ids (`added_cond_kwargs`) and builds its own embedding of them;
  minidream gets `size_conditioning` of the same. fp32 within 1e-5 relative (measured: equal to
  the bit); then the same weights cast in place to fp16 and to bf16, equal to diffusers' to the bit
  (as tests/test_unet.py asserts for SD 1.x);
- CLIP ViT-L/14: the penultimate states without the final norm, against transformers'
  CLIPTextModel `hidden_states[-2]`;
- OpenCLIP ViT-bigG/14 (694,659,840 parameters with text_projection): the penultimate states
  without the final norm and the pooled projection, against transformers'
  CLIPTextModelWithProjection `hidden_states[-2]` and `text_embeds` (diffusers' text_encoder_2).

Lean: every reference holds minidream's very tensors, so one copy of each model is in memory, and
the UNet (9.6 GiB in fp32) is gone before the text encoders are built. Measured with
`/usr/bin/time -v python -m pytest -q tests/test_sdxl_shapes.py` on the 2-core CPU: peak RSS
10.2 GiB; 64 s with the machine otherwise idle (the UNet's fixture 48 s), 4 min 54 s with its
cores busy.
"""

import pytest
import torch
import transformers
from reference_models import relative_error, unet_inputs
from sdxl_reference import clip_config
from test_clip import build_on_meta, random_state_dict
from test_open_clip_text import build_ours, random_open_clip_state
from transformers.initialization import no_init_weights

from bench.models import unet_twins
from minidream.config import SDXL
from minidream.io import open_clip_layout
from minidream.models.clip import CLIPTextModel
from minidream.models.tokenizer import CLIPTokenizer
from minidream.models.unet import size_conditioning

pytestmark = pytest.mark.sd_shapes  # full SDXL shapes: `-m "not sd_shapes"` leaves them out of a quick run

TOLERANCE = 1e-5  # max |minidream - reference| / max |reference|, fp32
PROMPTS = ["a photo of sks dog", "(masterpiece:1.2), a castle on a hill at sunset, trending on artstation, 8k", ""]
# Each row: original height, width, crop top, left, target height, width (an SDXL bucket and a cropped photo).
SIZE_IDS = torch.tensor([[1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0], [576.0, 1344.0, 64.0, 32.0, 832.0, 1216.0]])


@pytest.fixture(scope="module")
def unet_results():
    """(parameter count, {dtype: (minidream's output, diffusers')}). The two UNets share their
    Parameter objects, so one in-place cast serves both; the models are freed on return."""
    cfg = SDXL.unet
    unet, reference = unet_twins(cfg, seed=0, share_parameters=True)
    x, t, context = unet_inputs(cfg, [1, 998], height=16, width=12, seed=1)
    pooled = torch.randn(2, SDXL.text_encoder_2.width, generator=torch.Generator().manual_seed(2))
    outputs = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        unet.to(dtype)  # neither model has buffers: this casts the weights of both, in place
        latents, text, vector = x.to(dtype), context.to(dtype), pooled.to(dtype)
        with torch.no_grad():
            out = unet(latents, t, text, size_conditioning(vector, SIZE_IDS, cfg.size_embed_dim))
            expected = reference(
                latents, t, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": vector, "time_ids": SIZE_IDS}
            ).sample
        outputs[dtype] = out, expected
    return sum(p.numel() for p in unet.parameters()), outputs


def test_unet_is_sdxl_base_sized(unet_results):
    count, _ = unet_results
    assert count == 2_567_463_684


def test_unet_fp32_output_matches_diffusers(unet_results):
    out, expected = unet_results[1][torch.float32]
    assert relative_error(out, expected) <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_unet_half_precision_output_matches_diffusers_bit_for_bit(unet_results, dtype):
    out, expected = unet_results[1][dtype]
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out, expected)


def transformers_twin(model_class, config: transformers.CLIPTextConfig, state: dict[str, torch.Tensor]):
    """transformers' model holding `state`'s very tensors: built uninitialised (nothing is written
    to its own weights, so they take no memory; its constant position_ids buffer is made), then
    given them."""
    with no_init_weights():
        model = model_class(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def test_clip_l_penultimate_states_without_final_norm_match_transformers():
    cfg = SDXL.text_encoder
    with torch.device("meta"):
        shapes = CLIPTextModel(cfg)
    state = random_state_dict(shapes, seed=3)
    ours = build_on_meta(cfg, state)
    # transformers 5 names the modules without `text_model.`
    unprefixed = {name.removeprefix("text_model."): tensor for name, tensor in state.items()}
    reference = transformers_twin(transformers.CLIPTextModel, clip_config(cfg, cfg.layers), unprefixed)
    assert sum(p.numel() for p in reference.parameters()) == 123_060_480

    ids = CLIPTokenizer()(PROMPTS)  # SDXL's first tokenizer pads with EOS, as SD 1.x's
    expected = reference(ids, output_hidden_states=True).hidden_states[-2]
    assert relative_error(ours(ids), expected) <= TOLERANCE


@torch.no_grad()
def test_bigg_penultimate_states_and_pooled_projection_match_transformers():
    cfg = SDXL.text_encoder_2
    ours = build_ours(cfg, random_open_clip_state(cfg, seed=4))
    assert sum(p.numel() for p in ours.parameters()) + ours.text_projection.numel() == 694_659_840
    # diffusers' text_encoder_2: every resblock, and the projection as a Linear (weight P^T for x @ P).
    state = open_clip_layout.to_with_projection(ours.state_dict(), cfg.layers)
    config = clip_config(cfg, cfg.layers)
    reference = transformers_twin(transformers.CLIPTextModelWithProjection, config, state)
    assert sum(p.numel() for p in reference.parameters()) == 694_659_840

    ids = CLIPTokenizer(pad_token_id=0)(PROMPTS)  # bigG pads with id 0
    states, pooled = ours.encode(ids)
    expected = reference(ids, output_hidden_states=True)
    assert relative_error(states, expected.hidden_states[-2]) <= TOLERANCE
    assert relative_error(pooled, expected.text_embeds) <= TOLERANCE
