"""Classifier-free guidance algebra and the one-call batching."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from minidream.diffusion import guidance

scales = st.floats(-5, 20, allow_nan=False)


def pair(seed, shape=(3, 4, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@given(st.integers(0, 2**31))
def test_scale_one_gives_cond_and_zero_gives_uncond(seed):
    uncond, cond = pair(seed)
    torch.testing.assert_close(guidance.combine(uncond, cond, 1.0), cond, atol=1e-12, rtol=0)
    assert torch.equal(guidance.combine(uncond, cond, 0.0), uncond)


@given(st.integers(0, 2**31), scales, scales, st.floats(0, 1))
def test_guidance_is_affine_in_scale(seed, s1, s2, lam):
    uncond, cond = pair(seed)
    mixed = guidance.combine(uncond, cond, lam * s1 + (1 - lam) * s2)
    expected = lam * guidance.combine(uncond, cond, s1) + (1 - lam) * guidance.combine(uncond, cond, s2)
    torch.testing.assert_close(mixed, expected, atol=1e-9, rtol=1e-9)


@given(st.integers(0, 2**31), st.integers(1, 5))
def test_double_then_split_is_identity(seed, batch):
    uncond, cond = pair(seed, (batch, 2, 3))
    doubled = guidance.double_batch(uncond, cond)
    assert doubled.shape[0] == 2 * batch
    back_uncond, back_cond = guidance.split_batch(doubled)
    assert torch.equal(back_uncond, uncond) and torch.equal(back_cond, cond)


@given(st.integers(0, 2**31), scales)
def test_rescale_phi_zero_is_identity_and_phi_one_matches_cond_std(seed, scale):
    uncond, cond = pair(seed)
    guided = guidance.combine(uncond, cond, scale)
    assert torch.equal(guidance.rescale(guided, cond, 0.0), guided)
    full = guidance.rescale(guided, cond, 1.0)
    dims = (1, 2, 3)
    torch.testing.assert_close(full.std(dim=dims), cond.std(dim=dims), atol=1e-9, rtol=1e-9)


class CountingModel:
    """A stand-in UNet whose output depends on x, t and the context, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t, context):
        self.calls += 1
        return torch.sin(x) * (1 + t.double().reshape(-1, 1, 1, 1) / 1000) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)


@given(st.integers(0, 2**31), scales, st.sampled_from([0.0, 0.7]))
def test_guided_prediction_uses_one_batched_call_and_equals_two_separate_calls(seed, scale, phi):
    x, _ = pair(seed, (2, 4, 3, 3))
    uncond_ctx, cond_ctx = pair(seed + 1, (2, 7, 8))
    t = torch.tensor([10, 900])
    model = CountingModel()
    got = guidance.guided_prediction(model, x, t, (uncond_ctx,), (cond_ctx,), scale, phi)
    assert model.calls == 1
    uncond, cond = model(x, t, uncond_ctx), model(x, t, cond_ctx)
    expected = guidance.combine(uncond, cond, scale)
    if phi > 0 and scale != 1.0:
        expected = guidance.rescale(expected, cond, phi)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_guided_prediction_scale_one_skips_the_unconditional_half():
    x, _ = pair(0, (2, 4, 3, 3))
    uncond_ctx, cond_ctx = pair(1, (2, 7, 8))
    seen = []

    def model(x, t, context):
        seen.append(x.shape[0])
        return x * 2

    out = guidance.guided_prediction(model, x, torch.tensor(5), (uncond_ctx,), (cond_ctx,), 1.0)
    assert seen == [2] and torch.equal(out, x * 2)


def test_scalar_timestep_is_broadcast_to_the_doubled_batch():
    x, _ = pair(0, (2, 4, 3, 3))
    uncond_ctx, cond_ctx = pair(1, (2, 7, 8))
    model = CountingModel()
    got = guidance.guided_prediction(model, x, torch.tensor(500), (uncond_ctx,), (cond_ctx,), 7.5)
    t = torch.tensor([500, 500])
    expected = guidance.combine(model(x, t, uncond_ctx), model(x, t, cond_ctx), 7.5)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_every_conditioning_argument_is_doubled_unconditional_half_first():
    """SDXL's UNet takes (x, t, context, y): y is doubled beside the context, in the same order."""
    x, _ = pair(0, (2, 4, 3, 3))
    uncond_ctx, cond_ctx = pair(1, (2, 7, 8))
    uncond_y, cond_y = pair(2, (2, 5))
    calls = []

    def model(x, t, context, y):
        calls.append(x.shape[0])
        return torch.sin(x) + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) * y.sum(dim=1).reshape(-1, 1, 1, 1)

    got = guidance.guided_prediction(model, x, torch.tensor(3), (uncond_ctx, uncond_y), (cond_ctx, cond_y), 7.5)
    t = torch.tensor([3, 3])
    expected = guidance.combine(model(x, t, uncond_ctx, uncond_y), model(x, t, cond_ctx, cond_y), 7.5)
    assert calls[0] == 4
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_rescale_equals_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        rescale_noise_cfg,
    )

    uncond, cond = pair(7)
    guided = guidance.combine(uncond, cond, 7.5)
    torch.testing.assert_close(guidance.rescale(guided, cond, 0.7), rescale_noise_cfg(guided, cond, 0.7), atol=1e-12, rtol=0)
