"""Loss weighting, noise variants and robust losses (diffusion/loss_weighting.py) against their
formulas, diffusers' compute_snr, torch's smooth L1 and kohya sd-scripts' pseudo-Huber."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from hypothesis import given
from hypothesis import strategies as st
from plain_recipe import noise_and_timesteps

from minidream.diffusion import loss_weighting as lw
from minidream.diffusion import schedule
from minidream.training.order import sample_generator

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ALPHAS_CUMPROD = schedule.alphas_cumprod(schedule.make_betas("scaled_linear", 1000, 0.00085, 0.012))
ZERO_SNR = schedule.alphas_cumprod(schedule.rescale_zero_terminal_snr(schedule.make_betas("scaled_linear", 1000, 0.00085, 0.012)))
ALL_T = torch.arange(1000)


def generators(count: int, seed: int = 0) -> list[torch.Generator]:
    return [sample_generator(seed, 0, i, 0) for i in range(count)]


# --- SNR and min-SNR-gamma --------------------------------------------------------------------


def test_snr_matches_diffusers_compute_snr_at_every_timestep():
    ref = compute_snr(DDPMScheduler(**SD15), ALL_T)
    torch.testing.assert_close(lw.snr(ALPHAS_CUMPROD, ALL_T), ref, rtol=2e-6, atol=0)


def test_snr_matches_diffusers_on_a_zero_terminal_snr_schedule():
    ref = compute_snr(DDPMScheduler(**SD15, rescale_betas_zero_snr=True), ALL_T)
    ours = lw.snr(ZERO_SNR, ALL_T)
    torch.testing.assert_close(ours[:-1], ref[:-1], rtol=2e-6, atol=0)
    assert ours[-1].item() == ref[-1].item() == 0.0


@given(st.floats(0.1, 20.0), st.lists(st.integers(0, 999), min_size=1, max_size=16))
def test_min_snr_weights_equal_the_closed_forms_on_diffusers_snr(gamma, ts):
    """diffusers' train_text_to_image.py formula: min(snr, gamma) / snr (eps), / (snr + 1) (v)."""
    t = torch.tensor(ts)
    ref_snr = compute_snr(DDPMScheduler(**SD15), t).double()
    clamped = torch.stack([ref_snr, gamma * torch.ones_like(ref_snr)], dim=1).min(dim=1)[0]
    ours_snr = lw.snr(ALPHAS_CUMPROD, t)
    torch.testing.assert_close(lw.min_snr_weights(ours_snr, gamma, "epsilon").double(), clamped / ref_snr, rtol=3e-6, atol=0)
    torch.testing.assert_close(lw.min_snr_weights(ours_snr, gamma, "v_prediction").double(), clamped / (ref_snr + 1), rtol=3e-6, atol=0)


@given(st.floats(0.1, 20.0))
def test_min_snr_weight_properties(gamma):
    s = lw.snr(ALPHAS_CUMPROD, ALL_T)
    eps, v = lw.min_snr_weights(s, gamma, "epsilon"), lw.min_snr_weights(s, gamma, "v_prediction")
    assert torch.all((eps > 0) & (eps <= 1)) and torch.all((v > 0) & (v < 1))
    assert torch.all(eps[s <= gamma] == 1)  # only high-SNR (easy, low-noise) steps are down-weighted
    assert torch.all(eps[1:] >= eps[:-1])  # SNR falls with t, so the epsilon weight never falls
    assert torch.all(v <= gamma / (gamma + 1) * (1 + 1e-6))  # v's weight peaks where SNR = gamma
    # v = eps * SNR / (SNR + 1): v-prediction's target already carries (SNR + 1) of the x0 error.
    torch.testing.assert_close(v.double(), (eps.double() * s / (s + 1)), rtol=1e-5, atol=0)


def test_min_snr_weights_are_finite_at_zero_terminal_snr():
    s = lw.snr(ZERO_SNR, torch.tensor([0, 500, 999]))
    eps, v = lw.min_snr_weights(s, 5.0, "epsilon"), lw.min_snr_weights(s, 5.0, "v_prediction")
    assert torch.isfinite(eps).all() and torch.isfinite(v).all()
    assert eps[-1].item() == 1.0 and v[-1].item() == 0.0  # the limits at SNR = 0


def test_min_snr_rejects_bad_arguments():
    with pytest.raises(ValueError, match="snr_gamma"):
        lw.min_snr_weights(torch.ones(2), 0.0, "epsilon")
    with pytest.raises(ValueError, match="sample"):
        lw.min_snr_weights(torch.ones(2), 5.0, "sample")


# --- timesteps ---------------------------------------------------------------------------------


def test_full_range_timesteps_draw_what_the_training_step_draws():
    """With (0, T), the draw and the noise after it are the ones runs made before this option existed."""
    noise, t = noise_and_timesteps((4, 8, 8), generators(6), 1000)
    gens = generators(6)
    assert torch.equal(lw.sample_timesteps(gens, 0, 1000), t)
    assert torch.equal(torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in gens]), noise)


def test_timesteps_stay_in_range_and_cover_it():
    t = lw.sample_timesteps(generators(4000), 200, 210)
    assert t.dtype == torch.int64 and t.min().item() == 200 and t.max().item() == 209
    counts = torch.bincount(t - 200, minlength=10).double()
    # Uniform: each of 10 values ~ Binomial(4000, 0.1), mean 400, sd 19; 5 sd bounds.
    assert torch.all((counts - 400).abs() < 5 * 19)


def test_timestep_range_must_be_non_empty():
    with pytest.raises(ValueError, match="min_timestep < max_timestep"):
        lw.sample_timesteps(generators(1), 500, 500)


# --- offset noise and input perturbation --------------------------------------------------------


def draw_noise(count: int, shape=(4, 8, 8), seed: int = 0):
    gens = generators(count, seed)
    noise = torch.cat([torch.randn((1, *shape), generator=g) for g in gens])
    return noise, gens


def test_offset_noise_is_one_shift_per_sample_and_channel_with_the_stated_spread():
    noise, gens = draw_noise(4096)
    shifted = lw.offset_noise(noise, gens, 0.1)
    shift = shifted - noise  # B x C x H x W, constant over H, W
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # rounding of (n + s) - n
    z = shift[:, :, 0, 0].flatten() / 0.1  # 16384 draws of N(0, 1)
    assert abs(z.mean().item()) < 4 / math.sqrt(z.numel())  # 4 standard errors
    assert abs(z.var().item() - 1) < 4 * math.sqrt(2 / z.numel())
    # Per-sample variance of the total noise: 1 + offset^2.
    assert abs(shifted.var().item() - 1.01) < 0.01


def test_input_perturbation_adds_gamma_times_fresh_normal_noise():
    noise, gens = draw_noise(1024)
    original = noise.clone()
    perturbed = lw.perturbed_noise(noise, gens, 0.1)
    assert torch.equal(noise, original)  # the target's noise is left as it was
    z = ((perturbed - noise) / 0.1).flatten()
    assert abs(z.mean().item()) < 4 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1) < 4 * math.sqrt(2 / z.numel())
    # Fresh noise: uncorrelated with the noise it is added to.
    assert abs(torch.corrcoef(torch.stack([z, noise.flatten()]))[0, 1].item()) < 4 / math.sqrt(z.numel())


@pytest.mark.parametrize("draw", [lambda n, g: lw.offset_noise(n, g, 0.1), lambda n, g: lw.perturbed_noise(n, g, 0.1)], ids=["offset", "perturbation"])
def test_noise_variants_draw_each_sample_from_its_own_generator(draw):
    """A sample's values do not depend on the batch it is in: 4 samples at once == each alone."""
    noise, gens = draw_noise(4)
    batch = draw(noise, gens)
    for i in range(4):
        alone_noise, _ = draw_noise(4)
        g = generators(4)[i]
        torch.randn((1, 4, 8, 8), generator=g)  # the sample's noise comes first
        assert torch.equal(draw(alone_noise[i : i + 1], [g]), batch[i : i + 1])


@pytest.mark.parametrize("draw", [lw.offset_noise, lw.perturbed_noise], ids=["offset", "perturbation"])
def test_noise_variants_off_draw_nothing(draw):
    noise, gens = draw_noise(2)
    states = [g.get_state() for g in gens]
    assert draw(noise, gens, 0.0) is noise
    assert all(torch.equal(g.get_state(), s) for g, s in zip(gens, states))


# --- losses ------------------------------------------------------------------------------------


def pair(seed: int, shape=(3, 4, 5, 5), scale: float = 1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(shape, generator=g, dtype=dtype), scale * torch.randn(shape, generator=g, dtype=dtype)


def kohya_pseudo_huber(x, y, c):
    """kohya sd-scripts conditional_loss(loss_type="huber", reduction="none"), float64."""
    c = c.view(-1, *([1] * (x.ndim - 1)))
    return 2 * c * (torch.sqrt((x - y) ** 2 + c**2) - c)


def test_mse_is_the_per_sample_mean_squared_error():
    x, y = pair(0)
    torch.testing.assert_close(lw.per_sample_loss(x, y, "mse").double(), ((x - y) ** 2).mean(dim=(1, 2, 3)), rtol=1e-6, atol=0)


@given(st.integers(0, 2**31), st.floats(1e-3, 10.0), st.floats(0.01, 10.0))
def test_huber_matches_kohya_formula(seed, c, scale):
    x, y = pair(seed, scale=scale)
    huber_c = torch.full((3,), c, dtype=torch.float64)
    ref = kohya_pseudo_huber(x, y, huber_c).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lw.per_sample_loss(x, y, "huber", huber_c).double(), ref, rtol=1e-5, atol=1e-12)


def test_huber_limits():
    x, y = pair(1)
    l1, l2 = (x - y).abs().mean(dim=(1, 2, 3)), ((x - y) ** 2).mean(dim=(1, 2, 3))
    tiny, huge = torch.full((3,), 1e-4), torch.full((3,), 1e4)
    # c -> 0: 2c |d|, i.e. L1 scaled by 2c; relative error ~ c / |d|.
    torch.testing.assert_close(lw.per_sample_loss(x, y, "huber", tiny).double() / (2 * 1e-4), l1, rtol=2e-3, atol=0)
    # c -> inf: d^2, the MSE (relative error ~ d^2 / (4 c^2)); exact in fp32 thanks to the stable form.
    torch.testing.assert_close(lw.per_sample_loss(x, y, "huber", huge).double(), l2, rtol=1e-5, atol=0)


@given(st.integers(0, 2**31), st.lists(st.floats(1e-3, 5.0), min_size=3, max_size=3))
def test_smooth_l1_matches_torch_per_sample(seed, cs):
    x, y = pair(seed, dtype=torch.float32)
    ours = lw.per_sample_loss(x, y, "smooth_l1", torch.tensor(cs))
    ref = torch.stack([torch.nn.functional.smooth_l1_loss(x[i], y[i], beta=c) for i, c in enumerate(cs)])
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_smooth_l1_limits():
    x, y = pair(2, dtype=torch.float32)
    l1, l2 = (x - y).abs().mean(dim=(1, 2, 3)), ((x - y) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(lw.per_sample_loss(x, y, "smooth_l1", torch.full((3,), 1e-6)), l1, rtol=1e-5, atol=0)
    torch.testing.assert_close(lw.per_sample_loss(x, y, "smooth_l1", torch.full((3,), 1e3)) * 2e3, l2, rtol=1e-5, atol=0)


def test_losses_are_per_sample_in_fp32_for_half_inputs():
    x, y = pair(3, dtype=torch.bfloat16)
    for loss in lw.LOSSES:
        out = lw.per_sample_loss(x, y, loss, torch.full((3,), 0.1))
        assert out.shape == (3,) and out.dtype == torch.float32


def test_loss_arguments_are_checked():
    x, y = pair(4)
    with pytest.raises(ValueError, match="needs huber_c"):
        lw.per_sample_loss(x, y, "huber")
    with pytest.raises(ValueError, match="mse, huber, smooth_l1"):
        lw.per_sample_loss(x, y, "l1")


# --- scheduled Huber parameter ------------------------------------------------------------------


def test_huber_c_schedules_match_kohya_formulas():
    """kohya sd-scripts get_huber_threshold_if_needed (huber_scale=1), written out in float64."""
    c, t = 0.1, ALL_T
    ab = ALPHAS_CUMPROD.double()
    exponential = torch.exp(-(-math.log(c) / 1000) * t.double())
    sigmas = ((1.0 - ab) / ab) ** 0.5
    snr_schedule = (1 - c) / (1 + sigmas) ** 2 + c
    for name, ref in (("constant", torch.full((1000,), c, dtype=torch.float64)), ("exponential", exponential), ("snr", snr_schedule)):
        ours = lw.huber_c_schedule(name, c, t, ALPHAS_CUMPROD, 1000)
        assert ours.shape == (1000,) and ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), ref, rtol=2e-6, atol=0, msg=name)


def test_huber_c_schedules_run_from_about_one_to_huber_c():
    c = 0.1
    exponential = lw.huber_c_schedule("exponential", c, torch.tensor([0, 1000]), ALPHAS_CUMPROD, 1000)
    torch.testing.assert_close(exponential, torch.tensor([1.0, c]))
    zero = lw.huber_c_schedule("snr", c, torch.tensor([0, 999]), ZERO_SNR, 1000)
    assert zero[0].item() > 0.9 and zero[1].item() == pytest.approx(c, abs=1e-7)  # pure noise: c = huber_c
    snr_c = lw.huber_c_schedule("snr", c, ALL_T, ALPHAS_CUMPROD, 1000)
    assert torch.all(snr_c[1:] <= snr_c[:-1]) and torch.all((snr_c >= c) & (snr_c <= 1))
    with pytest.raises(ValueError, match="constant, exponential, snr"):
        lw.huber_c_schedule("linear", c, ALL_T, ALPHAS_CUMPROD, 1000)
    with pytest.raises(ValueError, match="huber_c must be > 0"):
        lw.huber_c_schedule("snr", 0.0, ALL_T, ALPHAS_CUMPROD, 1000)
