"""SD 2.1's upcast_attention: with half q and k the UNet computes q.k and the softmax in fp32, as
diffusers' classic AttnProcessor (get_attention_scores) does; fp32 is untouched."""

import dataclasses

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from reference_models import relative_error, unet_inputs

from bench.models import unet_twins
from minidream.config import SD21, TINY_SD2
from minidream.models.layers import multihead_attention
from minidream.models.unet import CrossAttention

HALF = [torch.float16, torch.bfloat16]


def half_twins(cfg, dtype, seed=0):
    """minidream's UNet and diffusers' (classic processor, so that upcast_attention is read) in `dtype`."""
    unet, reference = unet_twins(cfg, seed=seed)
    reference.set_attn_processor(AttnProcessor())
    return unet.to(dtype), reference.to(dtype)


def assert_equals_diffusers(cfg, dtype, height, width):
    assert cfg.upcast_attention
    unet, reference = half_twins(cfg, dtype)
    x, t, context = (a.to(dtype) if a.is_floating_point() else a for a in unet_inputs(cfg, [0, 999], height, width, seed=1))
    with torch.no_grad():
        out = unet(x, t, context)
        expected = reference(x, t, encoder_hidden_states=context).sample
    assert out.dtype == dtype
    assert torch.equal(out, expected)  # the same ops in the same order: bit for bit


@pytest.mark.parametrize("dtype", HALF)
def test_tiny_sd2_half_unet_equals_diffusers_with_upcast_attention(dtype):
    assert_equals_diffusers(TINY_SD2.unet, dtype, height=16, width=16)


@pytest.mark.sd_shapes
@pytest.mark.parametrize("dtype", HALF)
def test_sd21_half_unet_equals_diffusers_with_upcast_attention(dtype):
    """SD 2.1's UNet (64-wide heads, 1024-wide context) at a small latent."""
    assert_equals_diffusers(SD21.unet, dtype, height=8, width=8)


def test_fp32_ignores_the_flag():
    cfg = TINY_SD2.unet
    unet, _ = unet_twins(cfg, seed=0)
    plain, _ = unet_twins(dataclasses.replace(cfg, upcast_attention=False), seed=0)
    assert all(m.upcast for m in unet.modules() if isinstance(m, CrossAttention))
    x, t, context = unet_inputs(cfg, [3, 500], 16, 8, seed=1)
    with torch.no_grad():
        assert torch.equal(unet(x, t, context), plain(x, t, context))


def classic_half_attention(q, k, v):
    """diffusers' get_attention_scores without upcast_attention: scores and softmax in q's dtype."""
    scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype), q, k.transpose(1, 2),
                           beta=0, alpha=q.shape[-1] ** -0.5)
    return torch.bmm(scores.softmax(dim=-1), v)


def large_logit_inputs(dtype, magnitude):
    """One head (B x N x 64) whose logits q.k / 8 reach about `magnitude`, as SD 2.1's trained UNet's do."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 32, 64, generator=generator) for _ in range(3))
    scale = (magnitude * 8 / (q @ k.transpose(1, 2)).abs().max()).sqrt()
    return (q * scale).to(dtype), (k * scale).to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_upcast_scores_are_fp32_accurate_where_half_scores_are_not(dtype):
    q, k, v = large_logit_inputs(dtype, magnitude=500)
    exact = multihead_attention(q.double(), k.double(), v.double(), heads=1)  # the same half inputs, exactly
    upcast = multihead_attention(q, k, v, heads=1, upcast=True)
    half = classic_half_attention(q, k, v)
    assert upcast.dtype == dtype
    upcast_error, half_error = relative_error(upcast.double(), exact), relative_error(half.double(), exact)
    # measured: fp16 0.00028 vs 0.011, bf16 0.0016 vs 0.23: only the probabilities' rounding is left
    assert upcast_error <= 4e-3
    assert half_error >= 10 * upcast_error


def test_upcast_scores_do_not_overflow_fp16():
    """Logits past fp16's largest number (65504) are inf in half scores; fp32 scores stay finite."""
    q, k, v = large_logit_inputs(torch.float16, magnitude=1e5)
    exact = multihead_attention(q.double(), k.double(), v.double(), heads=1)
    assert not classic_half_attention(q, k, v).isfinite().all()
    assert relative_error(multihead_attention(q, k, v, heads=1, upcast=True).double(), exact) <= 4e-3


def test_upcast_is_fp32_under_autocast():
    q, k, v = large_logit_inputs(torch.bfloat16, magnitude=500)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = multihead_attention(q, k, v, heads=1, upcast=True)
    assert torch.equal(inside, multihead_attention(q, k, v, heads=1, upcast=True))


def test_causal_upcast_matches_sdpa_in_fp32():
    q, k, v = large_logit_inputs(torch.float16, magnitude=5)
    exact = multihead_attention(q.double(), k.double(), v.double(), heads=2, causal=True)
    assert relative_error(multihead_attention(q, k, v, heads=2, causal=True, upcast=True).double(), exact) <= 2e-3
