"""Properties of the noise-schedule math, checked in float64 over hypothesis-drawn inputs."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minidream.diffusion import schedule

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction")
ATOL = 1e-9


@st.composite
def schedule_args(draw):
    name = draw(st.sampled_from(SCHEDULES))
    steps = draw(st.integers(2, 2000))
    start = draw(st.floats(1e-5, 1e-2))
    end = draw(st.floats(start, 0.02))
    return name, steps, start, end


@st.composite
def alpha_pair(draw):
    """Two alpha_bar values of the SD schedule, t > t_prev (t_prev may be -1: after the last step)."""
    ac = schedule.alphas_cumprod(schedule.make_betas("scaled_linear", 1000, 0.00085, 0.012)).double()
    t = draw(st.integers(1, 999))
    t_prev = draw(st.integers(-1, t - 1))
    a_t = ac[t]
    a_prev = ac[t_prev] if t_prev >= 0 else ac[0]
    return a_t, a_prev


def sample_pair(seed: int, shape=(2, 4, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


@given(schedule_args())
def test_alphas_cumprod_strictly_decreasing_inside_unit_interval(args):
    ac = schedule.alphas_cumprod(schedule.make_betas(*args))
    assert ac.shape == (args[1],)
    assert bool((ac > 0).all() and (ac < 1).all())
    assert bool((ac[1:] < ac[:-1]).all())


@given(st.integers(0, 2**31), alpha_pair(), st.sampled_from(PREDICTIONS))
def test_add_noise_then_predict_x0_with_true_target_recovers_x0(seed, alphas, prediction):
    x0, noise = sample_pair(seed)
    a_t, _ = alphas
    x_t = schedule.add_noise(x0, noise, a_t)
    target = schedule.training_target(x0, noise, a_t, prediction)
    torch.testing.assert_close(schedule.predict_x0(x_t, target, a_t, prediction), x0, atol=ATOL, rtol=0)
    torch.testing.assert_close(schedule.predict_eps(x_t, target, a_t, prediction), noise, atol=ATOL, rtol=0)


@given(st.integers(0, 2**31), st.floats(1e-4, 1 - 1e-4))
def test_eps_x0_v_round_trip(seed, a):
    x0, noise = sample_pair(seed)
    a = torch.tensor(a, dtype=torch.float64)
    x_t = schedule.add_noise(x0, noise, a)
    v = schedule.v_target(x0, noise, a)
    torch.testing.assert_close(schedule.eps_from_x0(x_t, x0, a), noise, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(schedule.predict_x0(x_t, v, a, "v_prediction"), x0, atol=ATOL, rtol=0)
    torch.testing.assert_close(schedule.predict_eps(x_t, v, a, "v_prediction"), noise, atol=ATOL, rtol=0)
    # v, x_t is a rotation of (noise, x0): norms are preserved (Salimans & Ho 2022, fig. 1).
    torch.testing.assert_close(v**2 + x_t**2, noise**2 + x0**2, atol=1e-9, rtol=1e-9)


@given(st.integers(0, 2**31), alpha_pair(), st.sampled_from(PREDICTIONS))
def test_ddim_eta0_with_true_target_lands_on_the_same_trajectory(seed, alphas, prediction):
    x0, noise = sample_pair(seed)
    a_t, a_prev = alphas
    x_t = schedule.add_noise(x0, noise, a_t)
    target = schedule.training_target(x0, noise, a_t, prediction)
    x_prev = schedule.ddim_step(x_t, target, a_t, a_prev, prediction, eta=0.0)
    torch.testing.assert_close(x_prev, schedule.add_noise(x0, noise, a_prev), atol=ATOL, rtol=0)


@given(st.integers(0, 2**31), alpha_pair())
def test_ddim_eta0_is_deterministic_and_invertible(seed, alphas):
    x_t, eps = sample_pair(seed)
    a_t, a_prev = alphas
    first = schedule.ddim_step(x_t, eps, a_t, a_prev, "epsilon", eta=0.0)
    second = schedule.ddim_step(x_t, eps, a_t, a_prev, "epsilon", eta=0.0)
    assert torch.equal(first, second)
    # DDIM is an ODE discretisation: stepping back with the same eps returns to x_t.
    back = schedule.ddim_step(first, eps, a_prev, a_t, "epsilon", eta=0.0)
    torch.testing.assert_close(back, x_t, atol=1e-8, rtol=1e-8)


@given(st.integers(0, 2**31), alpha_pair())
def test_ddim_eta1_noise_has_ddpm_posterior_variance(seed, alphas):
    x_t, eps = sample_pair(seed)
    noise = sample_pair(seed + 1)[0]
    a_t, a_prev = alphas
    deterministic = schedule.ddim_step(x_t, eps, a_t, a_prev, "epsilon", eta=1.0, noise=torch.zeros_like(noise))
    noisy = schedule.ddim_step(x_t, eps, a_t, a_prev, "epsilon", eta=1.0, noise=noise)
    _, variance = schedule.ddpm_posterior(x_t, x_t, a_t, a_prev)
    torch.testing.assert_close(noisy - deterministic, variance.sqrt() * noise, atol=ATOL, rtol=0)


@given(schedule_args())
def test_ddpm_posterior_variance_nonnegative_and_closed_form(args):
    betas = schedule.make_betas(*args).double()
    ac = schedule.alphas_cumprod(betas)
    x = torch.zeros(len(ac) - 1)
    _, variance = schedule.ddpm_posterior(x, x, ac[1:], ac[:-1])
    assert bool((variance >= 0).all())
    # Ho et al. eq. 7: beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t
    torch.testing.assert_close(variance, (1 - ac[:-1]) / (1 - ac[1:]) * betas[1:], atol=1e-12, rtol=1e-9)


@given(st.integers(0, 2**31), alpha_pair())
def test_ddpm_posterior_mean_of_true_x0_is_unbiased(seed, alphas):
    """E[x_prev | x_t, x0] must equal the forward-process mean of x_prev given x0 when x_t is
    replaced by its own mean given x0 (the posterior mean is linear in x_t)."""
    x0, _ = sample_pair(seed)
    a_t, a_prev = alphas
    mean, _ = schedule.ddpm_posterior(a_t.sqrt() * x0, x0, a_t, a_prev)
    torch.testing.assert_close(mean, a_prev.sqrt() * x0, atol=ATOL, rtol=0)


@given(st.lists(st.integers(-1, 999), min_size=1, max_size=6))
def test_alpha_bar_at_gathers_per_sample_and_uses_final_for_negative(ts):
    ac = schedule.alphas_cumprod(schedule.make_betas("scaled_linear", 1000, 0.00085, 0.012))
    final = schedule.final_alpha_cumprod(ac, set_alpha_to_one=False)
    like = torch.zeros(len(ts), 4, 2, 2)
    got = schedule.alpha_bar_at(ac, torch.tensor(ts), like, final)
    assert got.shape == (len(ts), 1, 1, 1)
    expected = torch.stack([ac[t] if t >= 0 else ac[0] for t in ts])
    assert torch.equal(got.flatten(), expected)


@settings(max_examples=50)
@given(st.integers(1, 1000), st.sampled_from(schedule.TIMESTEP_SPACINGS))
def test_inference_timesteps_descending_and_in_range(n, spacing):
    offset = 1 if spacing == "leading" else 0
    ts = schedule.inference_timesteps(n, 1000, spacing, steps_offset=offset)
    assert len(ts) == n
    assert bool((ts[1:] < ts[:-1]).all())
    # Only "leading" with an offset can pass T - 1 (at N = T), exactly as diffusers does.
    assert 0 <= int(ts.min()) and int(ts.max()) <= 999 + offset


def test_bad_names_are_clear_errors():
    for call, needle in [
        (lambda: schedule.make_betas("cosine", 10, 0.1, 0.2), "unknown beta schedule 'cosine'"),
        (lambda: schedule.inference_timesteps(5, 1000, "uniform"), "unknown timestep spacing 'uniform'"),
        (lambda: schedule.inference_timesteps(0, 1000, "leading"), "num_inference_steps must be in [1, 1000]"),
        (lambda: schedule.predict_x0(torch.ones(1), torch.ones(1), torch.ones(1), "sample"), "unknown prediction type"),
    ]:
        try:
            call()
        except ValueError as error:
            assert needle in str(error)
        else:
            raise AssertionError(f"expected ValueError containing {needle!r}")
