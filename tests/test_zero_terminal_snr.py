"""Zero-terminal-SNR rescaling (Lin et al. 2024, Algorithm 1) against diffusers, and its properties."""

import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import (
    rescale_zero_terminal_snr as diffusers_rescale,
)
from hypothesis import given
from hypothesis import strategies as st

from minidream.diffusion import schedule

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@st.composite
def betas(draw):
    name = draw(st.sampled_from(SCHEDULES))
    steps = draw(st.integers(2, 2000))
    start = draw(st.floats(1e-5, 1e-2))
    end = draw(st.floats(start * 1.01, 0.03))
    dtype = draw(st.sampled_from((torch.float32, torch.float64)))
    return schedule.make_betas(name, steps, start, end).to(dtype)


@given(betas())
def test_matches_diffusers_rescale(b):
    ours, ref = schedule.rescale_zero_terminal_snr(b), diffusers_rescale(b.clone())
    assert ours.dtype == b.dtype and ours.shape == b.shape
    # Same algorithm, same dtype, same operation order: bit for bit.
    assert torch.equal(ours, ref)


@given(betas())
def test_final_alpha_bar_is_exactly_zero_and_first_unchanged(b):
    before = schedule.alphas_cumprod(b)
    after = schedule.alphas_cumprod(schedule.rescale_zero_terminal_snr(b))
    assert after[-1].item() == 0.0
    tol = 1e-6 if b.dtype == torch.float32 else 1e-13
    torch.testing.assert_close(after[0], before[0], rtol=tol, atol=0.0)


@given(betas())
def test_rescaled_schedule_is_a_valid_decreasing_schedule(b):
    rescaled = schedule.rescale_zero_terminal_snr(b)
    ab = schedule.alphas_cumprod(rescaled)
    assert torch.all(ab[:-1] > 0) and torch.all(ab <= 1)  # alpha_bar in (0, 1] before the last step
    assert torch.all(ab[1:] <= ab[:-1])  # monotone: noise only ever grows
    assert torch.all((rescaled > 0) & (rescaled <= 1))  # betas in (0, 1], the last exactly 1
    assert rescaled[-1].item() == 1.0
    # The shift-and-scale is affine in sqrt(alpha_bar): SNR order is kept and noise is only added.
    assert torch.all(ab <= schedule.alphas_cumprod(b) * (1 + 1e-6))


def test_sd15_schedule_matches_diffusers_scheduler_with_rescale_flag():
    """The alpha_bar diffusers' DDIMScheduler builds with rescale_betas_zero_snr=True (SD 1.5 betas), bit for bit."""
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    ours = schedule.alphas_cumprod(schedule.rescale_zero_terminal_snr(schedule.make_betas("scaled_linear", 1000, 0.00085, 0.012)))
    assert torch.equal(ours, ref.alphas_cumprod)
    assert ours[-1].item() == 0.0
    # The unscaled SD 1.5 schedule's terminal alpha_bar that this fixes (Lin et al., sec. 3.1: 0.0047).
    plain = schedule.alphas_cumprod(schedule.make_betas("scaled_linear", 1000, 0.00085, 0.012))
    assert abs(plain[-1].item() - 0.0047) < 1e-4
