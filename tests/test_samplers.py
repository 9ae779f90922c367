"""The samplers against their diffusers schedulers, configured as a pipeline configures them
from SD 1.5's scheduler config (`XScheduler.from_config(ddim_config)`), plus their properties."""

import dataclasses
import inspect
import io
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from hypothesis import given
from hypothesis import strategies as st
from sample_runs import DIFFUSERS_SCHEDULER_MARKS
from test_schedule_parity import fake_model, sd15_alphas_cumprod
from tqdm.auto import tqdm

from bench.schedulers import scheduler_from_config
from minidream.config import ScheduleConfig
from minidream.diffusion import samplers, schedule
from minidream.diffusion.sampling import Conditioning, denoise, image_generators

pytestmark = DIFFUSERS_SCHEDULER_MARKS

SHAPE = (2, 4, 8, 6)
SEED = 11
# (sampler name, eta, karras): every configuration sample.py offers.
CASES = [("ddim", 0.0, False), ("ddim", 1.0, False), ("ddpm", 0.0, False), ("euler-a", 0.0, False)]
CASES += [("dpmpp-2m", 0.0, False), ("dpmpp-2m", 0.0, True)]
CASES += [("euler", 0.0, False), ("euler", 0.0, True), ("heun", 0.0, False), ("heun", 0.0, True), ("plms", 0.0, False)]
CASES += [("lms", 0.0, False), ("lms", 0.0, True), ("dpmpp-2m-sde", 0.0, False), ("dpmpp-2m-sde", 0.0, True)]
CASES += [("unipc", 0.0, False), ("unipc", 0.0, True)]
CASE_IDS = ["ddim-eta0", "ddim-eta1", "ddpm", "euler-a", "dpmpp-2m", "dpmpp-2m-karras"]
CASE_IDS += ["euler", "euler-karras", "heun", "heun-karras", "plms", "lms", "lms-karras", "dpmpp-2m-sde", "dpmpp-2m-sde-karras", "unipc", "unipc-karras"]
# The samplers that draw nothing: their runs depend on the initial noise alone.
DETERMINISTIC = ["ddim", "dpmpp-2m", "euler", "heun", "plms", "lms", "unipc"]


# Per step, relative to max(1, |x|). Measured (torch 2.13, diffusers 0.42.1, CPU): 0 — every
# trajectory below is bitwise equal to diffusers', in float32 and in bfloat16 — except LMS: 7.0e-7
# at worst here (1.4e-6 for v, Karras, "trailing", 25 steps, not tested), all of it from diffusers'
# float32-integrand weights (assert_same_run's bf16 note).
TOLERANCE = 1e-6


def reference_scheduler(name: str, schedule_config: ScheduleConfig, karras: bool = False):
    """The diffusers scheduler a pipeline builds from a DDIM scheduler config with these values
    (for SD 1.5: scaled_linear 0.00085 -> 0.012, steps_offset 1, "leading", ...)."""
    # A field left None (a spacing the model's config does not give) is not passed, so it stays one
    # of the DDIM config's defaults, which `XScheduler.from_config` replaces by its own.
    given = {key: value for key, value in dataclasses.asdict(schedule_config).items() if value is not None}
    return scheduler_from_config(DDIMScheduler(**given).config, name, karras)


def per_image_generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(SEED + i) for i in range(SHAPE[0])]


def per_image_noise(generators: list[torch.Generator], dtype: torch.dtype) -> torch.Tensor:
    """One (1, C, h, w) draw per image, from that image's generator (DESIGN.md, same seed same image)."""
    return torch.cat([torch.randn((1, *SHAPE[1:]), generator=g, dtype=dtype) for g in generators])


def run_diffusers(scheduler, steps: int, eta: float, dtype: torch.dtype):
    """The loop of diffusers' StableDiffusionPipeline with `fake_model` as the UNet."""
    scheduler.set_timesteps(steps)
    generators = per_image_generators()
    x = randn_tensor(SHAPE, generator=generators, dtype=dtype) * scheduler.init_noise_sigma
    step_kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    if "generator" in inspect.signature(scheduler.step).parameters:  # Heun's and PNDM's steps take none
        step_kwargs["generator"] = generators
    fed_timesteps, trajectory = [], []
    for t in scheduler.timesteps:
        model_output = fake_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(model_output, t, x, **step_kwargs).prev_sample
        fed_timesteps.append(t)
        trajectory.append(x)
    return torch.stack(fed_timesteps), trajectory, [torch.randn(1, generator=g) for g in generators]


def run_minidream(sampler, dtype: torch.dtype):
    """The same loop through the sampler interface the sampling loop uses."""
    generators = per_image_generators()
    x = per_image_noise(generators, dtype) * sampler.init_noise_sigma
    state, trajectory = None, []
    for i, t in enumerate(sampler.timesteps):
        model_output = fake_model(sampler.scale_model_input(x, i), t)
        noise = per_image_noise(generators, getattr(sampler, "noise_dtype", dtype)) if sampler.draws_noise(i) else None
        x, state = sampler.step(x, model_output, i, state, noise)
        trajectory.append(x)
    return trajectory, [torch.randn(1, generator=g) for g in generators]


def worst_step_diff(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """The largest per-step max |ours - theirs| / max(1, max |theirs|) over a trajectory."""
    assert len(ours) == len(theirs)
    worst = 0.0
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = max(1.0, b.abs().max().item())
        worst = max(worst, (a.double() - b.double()).abs().max().item() / scale)
    return worst


def assert_same_run(name, eta, karras, prediction_type, spacing, steps, dtype=torch.float32, tolerance=TOLERANCE):
    config = ScheduleConfig(prediction_type=prediction_type, timestep_spacing=spacing)
    sampler = samplers.make_sampler(name, config, steps, eta=eta, karras=karras)
    ref = reference_scheduler(name, config, karras)
    ref_timesteps, theirs, ref_next_draws = run_diffusers(ref, steps, eta, dtype)
    if name == "lms" and dtype != torch.float32:
        # diffusers integrates the Lagrange basis with a float32 integrand, so its weights are off
        # the exact ones by up to 9e-8 (measured): invisible in float32 (2.5e-7 at the worst step),
        # but in bf16 enough to flip roundings (0.025). Here, given diffusers' weights, the bf16 run
        # itself is held to the bf16 bound.
        weights = [[ref.get_lms_coefficient(min(i + 1, 4), i, j) for j in range(min(i + 1, 4))] for i in range(steps)]
        sampler = dataclasses.replace(sampler, coefficients=tuple(map(tuple, weights)))
    ours, our_next_draws = run_minidream(sampler, dtype)
    # The UNet sees the same timesteps, values and dtype (float32 for euler-a, int64 otherwise).
    assert sampler.timesteps.dtype == ref_timesteps.dtype
    assert torch.equal(sampler.timesteps, ref_timesteps)
    assert sampler.init_noise_sigma == float(ref.init_noise_sigma)
    worst = worst_step_diff(ours, theirs)
    assert worst <= tolerance, f"worst step differs by {worst:.3g} (relative)"
    # Both sides drew the same number of times from every generator.
    assert torch.equal(torch.cat(our_next_draws), torch.cat(ref_next_draws))


@pytest.mark.parametrize("steps", [4, 10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("name", "eta", "karras"), CASES, ids=CASE_IDS)
def test_trajectory_equals_diffusers(name, eta, karras, prediction_type, steps):
    assert_same_run(name, eta, karras, prediction_type, "leading", steps)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize(("name", "eta", "karras"), CASES, ids=CASE_IDS)
def test_trajectory_equals_diffusers_with_other_spacings(name, eta, karras, spacing):
    # 25 steps: euler-a's linspace timesteps are then fractional, and DDPM's last one is t = 0.
    assert_same_run(name, eta, karras, "epsilon", spacing, 25)


@pytest.mark.parametrize("steps", [7, 25])
@pytest.mark.parametrize(("name", "eta", "karras"), CASES, ids=CASE_IDS)
def test_a_config_without_spacing_gives_each_sampler_its_diffusers_default(name, eta, karras, steps):
    """SD's own scheduler configs name no timestep_spacing: each sampler then spaces its timesteps as
    `XScheduler.from_config(that config)` does ("leading" for DDIM, DDPM and PNDM, else "linspace")."""
    assert_same_run(name, eta, karras, "v_prediction", None, steps)


@pytest.mark.parametrize(("name", "eta", "karras"), CASES, ids=CASE_IDS)
def test_bfloat16_trajectory_equals_diffusers(name, eta, karras):
    """In a low-precision dtype the constants enter in diffusers' order and dtypes, so the runs agree
    to within a bf16 rounding (2^-8) at the worst step."""
    assert_same_run(name, eta, karras, "v_prediction", "leading", 10, torch.bfloat16, tolerance=2**-8)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("spacing", schedule.TIMESTEP_SPACINGS)
@pytest.mark.parametrize(("name", "eta", "karras"), CASES, ids=CASE_IDS)
def test_timesteps_sigmas_and_initial_noise_scale_equal_diffusers(name, eta, karras, spacing, beta_schedule):
    config = ScheduleConfig(timestep_spacing=spacing, beta_schedule=beta_schedule)
    # Avoids the step counts where diffusers' "trailing" float arange gives N + 1 timesteps (see README).
    for steps in [1, 2, 3, 7, 15, 50, 100, 333, 997]:
        sampler = samplers.make_sampler(name, config, steps, eta=eta, karras=karras)
        ref = reference_scheduler(name, config, karras)
        ref.set_timesteps(steps)
        assert torch.equal(sampler.timesteps, ref.timesteps), steps
        assert sampler.init_noise_sigma == float(ref.init_noise_sigma), steps
        if hasattr(sampler, "sigmas"):
            assert torch.equal(sampler.sigmas, ref.sigmas), steps


def test_karras_sigmas_decrease_from_sigma_max_to_sigma_min():
    sigma_table = ((1 - sd15_alphas_cumprod()) / sd15_alphas_cumprod()) ** 0.5
    for steps in [2, 4, 25, 100]:
        sigmas = samplers.make_sampler("dpmpp-2m", ScheduleConfig(), steps, karras=True).sigmas
        assert bool((sigmas[1:] < sigmas[:-1]).all())
        assert sigmas[-1] == 0
        torch.testing.assert_close(sigmas[0], sigma_table[-1], rtol=1e-6, atol=0)
        torch.testing.assert_close(sigmas[-2], sigma_table[0], rtol=1e-6, atol=0)
    # Karras et al. eq. 5: sigma^(1/rho) is linear in the step index.
    ramp = samplers.karras_sigmas(0.03, 14.6, 9) ** (1 / samplers.KARRAS_RHO)
    torch.testing.assert_close(ramp.diff(), ramp.diff()[:1].expand(8), rtol=1e-12, atol=0)


def test_sigma_to_timestep_inverts_the_sigma_table():
    sigma_table = ((1 - sd15_alphas_cumprod()) / sd15_alphas_cumprod()) ** 0.5
    t = torch.tensor([0, 1, 37, 500, 998, 999])
    torch.testing.assert_close(samplers.sigma_to_timestep(sigma_table[t], sigma_table.log()), t.double(), atol=1e-4, rtol=0)


def sample_pair(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64), torch.randn(SHAPE, generator=g, dtype=torch.float64)


@given(st.integers(0, 2**31), st.floats(0.03, 15.0), st.sampled_from(schedule.PREDICTION_TYPES))
def test_euler_ancestral_step_to_sigma_zero_lands_on_x0(seed, sigma, prediction_type):
    x, model_output = sample_pair(seed)
    sigma_from = torch.tensor(sigma, dtype=torch.float64)
    alpha_bar = 1 / (sigma_from**2 + 1)
    x0 = schedule.predict_x0(x * alpha_bar.sqrt(), model_output, alpha_bar, prediction_type)
    # With sigma_to = 0 no noise is added (sigma_up = 0), whatever the draw.
    sigma_to = torch.zeros((), dtype=torch.float64)
    x_next = samplers.euler_ancestral_step(x, model_output, sigma_from, sigma_to, prediction_type, noise=x)
    torch.testing.assert_close(x_next, x0, atol=1e-9, rtol=0)


@given(st.integers(0, 2**31), st.integers(1, 999), st.data())
def test_dpmpp_first_order_step_is_ddim(seed, t, data):
    """DPM-Solver++ of order 1 is DDIM with eta = 0 (Lu et al. 2022, "DPM-Solver++")."""
    x, eps = sample_pair(seed)
    alpha_bars = sd15_alphas_cumprod().double()
    t_next = data.draw(st.integers(0, t - 1))
    sigma = ((1 - alpha_bars) / alpha_bars).sqrt()
    x_next, _ = samplers.dpmpp_2m_step(x, eps, sigma[t], sigma[t_next], "epsilon")
    ddim = schedule.ddim_step(x, eps, alpha_bars[t], alpha_bars[t_next], "epsilon")
    torch.testing.assert_close(x_next, ddim, atol=1e-9, rtol=0)


@pytest.mark.parametrize("prediction_type", schedule.PREDICTION_TYPES)
def test_dpmpp_step_to_sigma_zero_returns_its_x0(prediction_type):
    x, model_output = sample_pair(5)
    x_next, x0 = samplers.dpmpp_2m_step(x, model_output, torch.tensor(2.5), torch.tensor(0.0), prediction_type)
    assert torch.equal(x_next, x0)


def test_draws_noise_follows_diffusers_draws():
    steps = 10
    assert [samplers.make_sampler("ddim", ScheduleConfig(), steps).draws_noise(i) for i in range(steps)] == [False] * steps
    assert all(samplers.make_sampler("ddim", ScheduleConfig(), steps, eta=0.5).draws_noise(i) for i in range(steps))
    assert all(samplers.make_sampler("euler-a", ScheduleConfig(), steps).draws_noise(i) for i in range(steps))
    dpmpp = samplers.make_sampler("dpmpp-2m", ScheduleConfig(), steps, karras=True)
    assert not any(dpmpp.draws_noise(i) for i in range(steps))
    # DDPM draws while t > 0: with "leading" spacing and steps_offset 1 that is every step, with
    # "linspace" (which ends on t = 0) all but the last.
    assert all(samplers.make_sampler("ddpm", ScheduleConfig(), steps).draws_noise(i) for i in range(steps))
    linspace = samplers.make_sampler("ddpm", ScheduleConfig(timestep_spacing="linspace"), steps)
    assert [linspace.draws_noise(i) for i in range(steps)] == [True] * (steps - 1) + [False]


def test_step_refuses_noise_that_would_shift_the_generators():
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="draws no noise"):
        samplers.make_sampler("dpmpp-2m", ScheduleConfig(), 4).step(x, x, 0, None, x)
    with pytest.raises(ValueError, match="draws noise"):
        samplers.make_sampler("euler-a", ScheduleConfig(), 4).step(x, x, 0, None, None)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("dpm++", 10), "choose one of ddim, ddpm, euler-a, dpmpp-2m"),
        (("euler-a", 10, 0.5), "eta applies only to the ddim sampler"),
        (("ddim", 10, 1.5), r"eta must be in \[0, 1\]"),
        (("ddim", 10, 0.0, True), "karras sigmas apply only to the euler, heun, lms, dpmpp-2m, dpmpp-2m-sde, unipc samplers, not ddim"),
        (("euler-a", 10, 0.0, True), "karras sigmas apply only to .* samplers, not euler-a"),
        (("plms", 10, 0.0, True), "karras sigmas apply only to .* samplers, not plms"),
        (("ddim", 0), r"num_steps must be in \[1, 999\]"),
        (("dpmpp-2m", 999), "reach timestep 1000 >= 1000"),
    ],
)
def test_bad_arguments_raise_one_line_value_errors(args, message):
    name, steps, *rest = args
    with pytest.raises(ValueError, match=message) as error:
        samplers.make_sampler(name, ScheduleConfig(timestep_spacing="leading"), steps, *rest)
    assert "\n" not in str(error.value)


def test_bad_prediction_type_names_the_choices():
    with pytest.raises(ValueError, match="choose one of epsilon, v_prediction"):
        samplers.make_sampler("ddim", ScheduleConfig(prediction_type="sample"), 10)


def test_sampler_is_frozen():
    sampler = samplers.make_sampler("euler-a", ScheduleConfig(), 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sampler.init_noise_sigma = 1.0


@pytest.mark.parametrize("name", ["euler", "heun", "lms"])
def test_karras_sigmas_of_euler_heun_and_lms_span_the_spacings_sigmas(name):
    """diffusers' Euler-family Karras ramp runs between the first and last sigma of the spacing's
    timesteps (not the whole table, as DPM-Solver's does), each at a fractional timestep."""
    for spacing in schedule.TIMESTEP_SPACINGS:
        config = ScheduleConfig(timestep_spacing=spacing)
        plain, karras = (samplers.make_sampler(name, config, 9, karras=k) for k in (False, True))
        # Heun lists every sigma after the first twice.
        plain_sigmas, sigmas = plain.sigmas.unique_consecutive(), karras.sigmas.unique_consecutive()
        assert len(sigmas) == 10 and bool((sigmas[1:] < sigmas[:-1]).all()) and sigmas[-1] == 0
        torch.testing.assert_close(sigmas[[0, -2]], plain_sigmas[[0, -2]], rtol=1e-6, atol=0)
        assert not torch.equal(karras.timesteps, karras.timesteps.round())


@given(st.integers(0, 2**31), st.sampled_from(DETERMINISTIC), st.sampled_from(schedule.PREDICTION_TYPES), st.integers(1, 12))
def test_deterministic_samplers_are_deterministic(seed, name, prediction_type, steps):
    """No step draws, and the same start gives the same run, bit for bit."""
    sampler = samplers.make_sampler(name, ScheduleConfig(prediction_type=prediction_type), steps)
    assert not any(sampler.draws_noise(i) for i in range(len(sampler.timesteps)))
    runs = []
    for _ in range(2):
        x, state = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)), None
        for i, t in enumerate(sampler.timesteps):
            x, state = sampler.step(x, fake_model(sampler.scale_model_input(x, i), t), i, state, None)
        runs.append(x)
    assert torch.equal(*runs)


@given(st.integers(0, 2**31), st.integers(1, 999), st.sampled_from(schedule.PREDICTION_TYPES), st.data())
def test_plms_first_step_is_ddim(seed, t, prediction_type, data):
    """PLMS's first transfer, with one model output, is PNDM eq. 9 = DDIM with eta = 0."""
    x, model_output = sample_pair(seed)
    alpha_bars = sd15_alphas_cumprod().double()
    t_next = data.draw(st.integers(0, t - 1))
    combined = samplers.plms_output((model_output,))
    x_next = samplers.pndm_transfer(x, combined, alpha_bars[t], alpha_bars[t_next], prediction_type)
    ddim = schedule.ddim_step(x, model_output, alpha_bars[t], alpha_bars[t_next], prediction_type)
    torch.testing.assert_close(x_next, ddim, atol=1e-9, rtol=1e-9)


@given(st.integers(0, 2**31), st.floats(0.03, 15.0), st.floats(0.0, 1.0), st.sampled_from(schedule.PREDICTION_TYPES))
def test_heun_predictor_is_the_euler_step(seed, sigma, fraction, prediction_type):
    x, model_output = sample_pair(seed)
    sigma_from = torch.tensor(sigma, dtype=torch.float64)
    sigma_to = sigma_from * fraction
    predicted, _ = samplers.heun_step(x, model_output, sigma_from, sigma_to, prediction_type)
    torch.testing.assert_close(predicted, samplers.euler_step(x, model_output, sigma_from, sigma_to, prediction_type))


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_unet_calls_per_run(steps):
    """What the progress bar counts: N calls, Heun 2N - 1, PLMS N + 1 (N >= 2)."""
    names = ("euler", "heun", "plms", "lms", "dpmpp-2m-sde", "unipc")
    calls = {name: len(samplers.make_sampler(name, ScheduleConfig(), steps).timesteps) for name in names}
    assert calls == {"euler": steps, "heun": 2 * steps - 1, "plms": steps + 1 if steps > 1 else 1, "lms": steps,
                     "dpmpp-2m-sde": steps, "unipc": steps}


@given(st.lists(st.floats(0.01, 20.0), min_size=5, max_size=5, unique=True), st.integers(0, 3))
def test_lms_coefficients_integrate_the_lagrange_basis(sigmas, order_less):
    """The weights sum to the step (the basis sums to 1) and integrate every polynomial of degree
    < order exactly: sum_j c_j p(sigma_{i-j}) = integral of p over the step."""
    sigmas = sorted(sigmas, reverse=True)
    i, order = 3, 4 - order_less
    coefficients = samplers.lms_coefficients(sigmas, i, order)
    low, high = sigmas[i], sigmas[i + 1]
    for degree in range(order):
        exact = (high ** (degree + 1) - low ** (degree + 1)) / (degree + 1)
        approx = sum(c * sigmas[i - j] ** degree for j, c in enumerate(coefficients))
        assert abs(approx - exact) <= 1e-9 * max(1.0, abs(exact))


@given(st.integers(0, 2**31), st.integers(1, 999), st.sampled_from(schedule.PREDICTION_TYPES), st.data())
def test_dpmpp_sde_first_order_step_without_noise_is_its_deterministic_part(seed, t, prediction_type, data):
    """The first-order SDE step in float64 against Lu et al. 2022's SDE-DPM-Solver++(1), written
    with alpha_bar: x_next = sqrt((1 - a')/(1 - a)) e^-h x + sqrt(a') (1 - e^-2h) x0
    + sqrt(1 - a') sqrt(1 - e^-2h) noise, h the step in half log-SNR; the noise enters linearly."""
    x, model_output = sample_pair(seed)
    alpha_bars = sd15_alphas_cumprod().double()
    t_next = data.draw(st.integers(0, t - 1))
    sigma = ((1 - alpha_bars) / alpha_bars).sqrt()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    zero = torch.zeros_like(noise)
    x_mean, x0 = samplers.dpmpp_2m_step(x, model_output, sigma[t], sigma[t_next], prediction_type, noise=zero)
    x_noisy, _ = samplers.dpmpp_2m_step(x, model_output, sigma[t], sigma[t_next], prediction_type, noise=noise)
    a, a_next = alpha_bars[t], alpha_bars[t_next]
    h = 0.5 * (torch.log(a_next / (1 - a_next)) - torch.log(a / (1 - a)))
    expected = ((1 - a_next) / (1 - a)).sqrt() * torch.exp(-h) * x + a_next.sqrt() * (1 - torch.exp(-2 * h)) * x0
    torch.testing.assert_close(x_mean, expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(x_noisy - x_mean, (1 - a_next).sqrt() * (1 - torch.exp(-2 * h)).sqrt() * noise)


@given(st.integers(0, 2**20), st.sampled_from(["dpmpp-2m-sde", "euler-a", "ddpm"]), st.booleans(), st.integers(1, 8))
def test_stochastic_samplers_draw_only_from_each_images_generator(seed, name, karras, steps):
    """Same seed, same image: image i of a batch equals that image sampled alone (its generator,
    seed + i, gives its initial latents and every step's noise), whatever the batch size."""
    karras = karras and name in samplers.KARRAS_SAMPLERS
    sampler = samplers.make_sampler(name, ScheduleConfig(), steps, karras=karras)
    noise_dtype = getattr(sampler, "noise_dtype", torch.float32)

    def run(seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        draw = lambda: torch.cat([torch.randn((1, *SHAPE[1:]), generator=g, dtype=noise_dtype) for g in generators])  # noqa: E731
        x, state = draw() * sampler.init_noise_sigma, None
        for i, t in enumerate(sampler.timesteps):
            noise = draw() if sampler.draws_noise(i) else None
            x, state = sampler.step(x, fake_model(sampler.scale_model_input(x, i), t), i, state, noise)
        return x

    batch = run([seed, seed + 1, seed + 2])
    assert torch.equal(batch[1:2], run([seed + 1]))
    assert torch.equal(batch[2:], run([seed + 2]))


@given(st.integers(0, 2**31), st.integers(1, 999), st.sampled_from(schedule.PREDICTION_TYPES), st.data())
def test_multistep_first_steps_are_first_order(seed, t, prediction_type, data):
    """With no history, UniPC's predictor and DPM++ 2M SDE's mean are DPM-Solver++(1) / its SDE
    form, and DPM-Solver++(1) and UniP-1 are DDIM with eta = 0 (Lu et al. 2022; Zhao et al. 2023)."""
    x, model_output = sample_pair(seed)
    alpha_bars = sd15_alphas_cumprod().double()
    t_next = data.draw(st.integers(0, t - 1))
    sigma = ((1 - alpha_bars) / alpha_bars).sqrt()
    dpm, x0 = samplers.dpmpp_2m_step(x, model_output, sigma[t], sigma[t_next], prediction_type)
    unipc = samplers.unipc_step(x, x0, sigma[t], sigma[t_next])
    ddim = schedule.ddim_step(x, model_output, alpha_bars[t], alpha_bars[t_next], prediction_type)
    torch.testing.assert_close(unipc, dpm, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(unipc, ddim, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(("name", "calls"), [("euler", 5), ("heun", 9), ("plms", 6), ("unipc", 5)])
def test_denoise_counts_every_unet_call_in_its_progress(name, calls):
    """Heun's second call per step and PLMS's extra first call are progress, not hidden work."""
    unet_calls = []

    def unet(x, t, context):
        unet_calls.append(t)
        return fake_model(x, t)

    pipe = SimpleNamespace(unet=unet, config=SimpleNamespace(schedule=ScheduleConfig()), dtype=torch.float32,
                           device=torch.device("cpu"))
    conditioning = Conditioning(torch.zeros(1, 77, 8))
    with tqdm(total=5, file=io.StringIO()) as bar:
        denoise(pipe, conditioning, conditioning, image_generators([0]), (4, 8, 8), name, 5, 1.0, progress=bar)
        assert bar.n == bar.total == len(unet_calls) == calls
