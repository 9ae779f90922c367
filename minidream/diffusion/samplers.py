"""The samplers `sample.py` offers, each matched step for step to its diffusers scheduler.

ddim       DDIM (Song et al. 2021), eta configurable (0 = deterministic)   ~ DDIMScheduler
ddpm       ancestral DDPM (Ho et al. 2020), strided                         ~ DDPMScheduler
euler-a    Euler ancestral (k-diffusion's sample_euler_ancestral)          ~ EulerAncestralDiscreteScheduler
dpmpp-2m   DPM-Solver++(2M) (Lu et al. 2022), optionally Karras sigmas      ~ DPMSolverMultistepScheduler
euler      Euler (Karras et al. 2022, Alg. 1 without the correction)       ~ EulerDiscreteScheduler
heun       Heun (Karras et al. 2022, Alg. 1): 2 UNet calls per step         ~ HeunDiscreteScheduler
plms       PLMS (Liu et al. 2022, PNDM eq. 12 with eq. 9): N + 1 calls      ~ PNDMScheduler(skip_prk_steps=True)
lms        linear multistep of order 4 (Karras et al. 2022, k-diffusion)    ~ LMSDiscreteScheduler
dpmpp-2m-sde  DPM-Solver++(2M) SDE (Lu et al. 2022), fresh noise each step  ~ DPMSolverMultistepScheduler
                                                                              (algorithm_type="sde-dpmsolver++")
unipc      UniPC (Zhao et al. 2023), order 2, B(h) = e^h - 1 ("bh2")      ~ UniPCMultistepScheduler

The math of each update is a pure function of tensors (`minidream.diffusion.schedule.ddim_step`,
`schedule.ddpm_step`, `euler_step`, `euler_ancestral_step`, `heun_step`, `lms_step`,
`pndm_transfer`, `dpmpp_2m_step`, `unipc_step`). `make_sampler` wraps one of
them in a small frozen object that holds the precomputed schedule of one run; the caller
owns the loop, the step index and the random draws:

    sampler = make_sampler("euler-a", schedule_config, num_steps=25)
    # len(sampler.timesteps) UNet calls: N, except heun (2N - 1) and plms (N + 1)
    x = noise * sampler.init_noise_sigma
    state = None
    for i, t in enumerate(sampler.timesteps):
        model_output = unet(sampler.scale_model_input(x, i), t, context)
        noise = draw_per_image_noise() if sampler.draws_noise(i) else None
        x, state = sampler.step(x, model_output, i, state, noise)

The Euler family, LMS, DPM-Solver++ and UniPC are written with the noise level of Karras et al. 2022,
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): the SD (variance-preserving) sample x_VP is
the variance-exploding x_VE = x0 + sigma_t eps scaled by sqrt(alpha_bar_t).

Schedule constants stay float32 CPU tensors and enter the update as 0-dim tensors, in the
order and dtypes diffusers uses, so the numbers agree with diffusers in every dtype.
"""

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from minidream.config import SAMPLERS, ScheduleConfig
from minidream.diffusion import schedule

KARRAS_RHO = 7.0  # Karras et al. 2022, sec. 3: rho = 7 balances the step sizes over sigma
# The samplers with a Karras-sigma form (diffusers' use_karras_sigmas).
KARRAS_SAMPLERS = ("euler", "heun", "lms", "dpmpp-2m", "dpmpp-2m-sde", "unipc")
LMS_ORDER = 4  # diffusers' LMSDiscreteScheduler.step default, as pipelines call it


class Sampler(Protocol):
    """What the sampling loop uses; every sampler below provides it and holds nothing mutable."""

    timesteps: torch.Tensor  # [N], on the CPU: the t given to the UNet at step i
    init_noise_sigma: float  # the initial latents are randn * init_noise_sigma
    # Optional: the dtype of the per-step draws where it is not the model's (dpmpp-2m-sde: float32).
    # noise_dtype: torch.dtype

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The UNet's input at step i, from the sampler's current sample."""

    def draws_noise(self, i: int) -> bool:
        """Whether step i takes a standard normal draw (the generators advance only then)."""

    def step(
        self, x: torch.Tensor, model_output: torch.Tensor, i: int, state: torch.Tensor | None, noise: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Step i: the next sample and the state to pass to step i + 1 (None to start)."""


def check_sampler_options(name: str, eta: float = 0.0, karras: bool = False) -> None:
    """Raise ValueError unless `name` is a sampler and the options fit it (what sample.py and
    the training config check before any model loads)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    if eta != 0 and name != "ddim":
        raise ValueError(f"eta applies only to the ddim sampler, not {name}; leave it at 0")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM's variance), got {eta}")
    if karras and name not in KARRAS_SAMPLERS:
        raise ValueError(f"karras sigmas apply only to the {', '.join(KARRAS_SAMPLERS)} samplers, not {name}")


def default_spacing(name: str) -> str:
    """The timestep spacing of sampler `name` when the model's scheduler config names none: its
    diffusers scheduler's default, as `XScheduler.from_config(pipe.scheduler.config)` gives it:
    "leading" for DDIM, DDPM and PNDM (plms), "linspace" for the others (Euler, Euler ancestral,
    Heun, LMS, DPM-Solver and UniPC)."""
    return "leading" if name in ("ddim", "ddpm", "plms") else "linspace"


def make_sampler(
    name: str, schedule_config: ScheduleConfig, num_steps: int, eta: float = 0.0, karras: bool = False
) -> Sampler:
    """The sampler `name` for an N-step run, configured as a diffusers pipeline configures
    `XScheduler.from_config(config)` from the same schedule config."""
    check_sampler_options(name, eta, karras)
    schedule.check_prediction_type(schedule_config.prediction_type)
    spacing = schedule_config.timestep_spacing or default_spacing(name)
    schedule_config = dataclasses.replace(schedule_config, timestep_spacing=spacing)
    total = schedule_config.num_train_timesteps
    if not 1 <= num_steps < total:
        raise ValueError(f"num_steps must be in [1, {total - 1}], got {num_steps}")

    alphas_cumprod = schedule.alphas_cumprod_of(schedule_config)
    offset = schedule_config.steps_offset
    if name == "ddim":
        sampler = _ddim(schedule_config, alphas_cumprod, num_steps, eta)
    elif name == "ddpm":
        sampler = _ddpm(schedule_config, alphas_cumprod, num_steps)
    elif name == "euler-a":
        sampler = _euler_ancestral(schedule_config, alphas_cumprod, num_steps)
    elif name in ("euler", "heun"):
        sampler = _euler_or_heun(name, schedule_config, alphas_cumprod, num_steps, karras)
    elif name == "plms":
        sampler = _plms(schedule_config, alphas_cumprod, num_steps)
    elif name == "lms":
        sampler = _lms(schedule_config, alphas_cumprod, num_steps, karras)
    elif name == "unipc":
        sampler = UniPCSampler(*_dpm_solver_schedule(schedule_config, alphas_cumprod, num_steps, karras, unipc=True),
                               prediction_type=schedule_config.prediction_type)  # fmt: skip
    else:
        sampler = _dpmpp_2m(name, schedule_config, alphas_cumprod, num_steps, karras)
    if sampler.timesteps.max() >= total:
        raise ValueError(
            f"{num_steps} steps with {spacing!r} spacing and steps_offset {offset} reach timestep "
            f"{int(sampler.timesteps.max())} >= {total}; use fewer steps"
        )
    return sampler


class _UnscaledNoDraws:
    """For samplers that feed the UNet their sample as it is and draw no noise."""

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def draws_noise(self, i: int) -> bool:
        return False


# --- DDIM and DDPM: the update rules of minidream.diffusion.schedule, stepping between alpha_bar values ---


@dataclass(frozen=True)
class _AlphaBarSampler:
    """What DDIM and DDPM share: they step between alpha_bar values and feed the UNet x as is."""

    timesteps: torch.Tensor  # int64 [N]
    alpha_bars: torch.Tensor  # float32 [N]: alpha_bar at each step's timestep
    alpha_bars_next: torch.Tensor  # float32 [N]: alpha_bar each step lands on
    prediction_type: str
    clip_sample: float | None
    init_noise_sigma: float = 1.0

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x


@dataclass(frozen=True)
class DDIMSampler(_AlphaBarSampler):
    eta: float = 0.0

    def draws_noise(self, i: int) -> bool:
        return self.eta > 0

    def step(self, x, model_output, i, state, noise):
        _check_noise(self, i, noise)
        a_t, a_next = self.alpha_bars[i], self.alpha_bars_next[i]
        x_next = schedule.ddim_step(x, model_output, a_t, a_next, self.prediction_type, self.eta, noise, self.clip_sample)
        return x_next, None


@dataclass(frozen=True)
class DDPMSampler(_AlphaBarSampler):
    def draws_noise(self, i: int) -> bool:
        # diffusers draws whenever t > 0, so with steps_offset = 1 also on the last step, where the
        # posterior variance is 0 (clamped to 1e-20) and the draw changes nothing but the generator.
        return bool(self.timesteps[i] > 0)

    def step(self, x, model_output, i, state, noise):
        _check_noise(self, i, noise)
        a_t, a_next = self.alpha_bars[i], self.alpha_bars_next[i]
        x_next = schedule.ddpm_step(x, model_output, a_t, a_next, self.prediction_type, noise, self.clip_sample)
        return x_next, None


def _ddim(config: ScheduleConfig, alphas_cumprod: torch.Tensor, num_steps: int, eta: float) -> DDIMSampler:
    total = config.num_train_timesteps
    timesteps = schedule.inference_timesteps(num_steps, total, config.timestep_spacing, config.steps_offset)
    # Whatever the spacing, DDIM steps back by T // N (as diffusers' DDIMScheduler does).
    landing = schedule.ddim_previous_timestep(timesteps, total, num_steps)
    alpha_bars, alpha_bars_next = _transfer_alpha_bars(config, alphas_cumprod, timesteps, landing)
    return DDIMSampler(
        timesteps=timesteps,
        alpha_bars=alpha_bars,
        alpha_bars_next=alpha_bars_next,
        prediction_type=config.prediction_type,
        eta=eta,
        clip_sample=1.0 if config.clip_sample else None,
    )


def _transfer_alpha_bars(
    config: ScheduleConfig, alphas_cumprod: torch.Tensor, starts: torch.Tensor, landing: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_bar at each step's start and landing timestep; a landing before t = 0 (negative) takes
    the final alpha_bar (alpha_bar_0, or 1 with set_alpha_to_one), as DDIM and PNDM do."""
    final = schedule.final_alpha_cumprod(alphas_cumprod, config.set_alpha_to_one)
    return alphas_cumprod[starts], schedule.alpha_bar_at(alphas_cumprod, landing, alphas_cumprod, final)


def _ddpm(config: ScheduleConfig, alphas_cumprod: torch.Tensor, num_steps: int) -> DDPMSampler:
    total = config.num_train_timesteps
    timesteps = schedule.inference_timesteps(num_steps, total, config.timestep_spacing, config.steps_offset)
    # DDPM steps to the next listed timestep and, after the last, to alpha_bar = 1 (clean data).
    landing = schedule.next_in_sequence(timesteps)
    return DDPMSampler(
        timesteps=timesteps,
        alpha_bars=alphas_cumprod[timesteps],
        alpha_bars_next=schedule.alpha_bar_at(alphas_cumprod, landing, alphas_cumprod, 1.0),
        prediction_type=config.prediction_type,
        clip_sample=1.0 if config.clip_sample else None,
    )


# --- Euler ancestral ---


def euler_step(
    x: torch.Tensor, model_output: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = (x - x0) / sigma of the VE sample x
    from sigma_from to sigma_to (Karras et al. 2022, eqs. 1 and 3 with sigma(t) = t; their
    Algorithm 1 without the second-order correction). sigma_to = 0 lands on the predicted x0.
    Computed in at least float32 (as diffusers upcasts), returned in model_output's dtype."""
    return _euler_update(x, model_output, sigma_from, sigma_to, prediction_type).to(model_output.dtype)


def _euler_update(x, model_output, sigma_from, sigma_to, prediction_type) -> torch.Tensor:
    """euler_step before its cast back: at least float32."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    derivative = (x - _x0_from_ve(x, model_output, sigma_from, prediction_type)) / sigma_from
    return x + derivative * (sigma_to - sigma_from)


def euler_ancestral_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    prediction_type: str,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One Euler ancestral step of the VE sample x from sigma_from to sigma_to (k-diffusion).

    The ancestral step splits sigma_to into a deterministic part sigma_down and fresh noise
    sigma_up, sigma_down^2 + sigma_up^2 = sigma_to^2, with sigma_up chosen so the step has
    DDPM's posterior variance; then one Euler step (euler_step) goes to sigma_down, and
    sigma_up * noise is added. sigma_to = 0 lands on the predicted x0.
    Computed in at least float32 (as diffusers upcasts), returned in model_output's dtype.
    """
    if noise is None:
        raise ValueError("euler_ancestral_step needs a noise tensor on every step")
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    x_next = _euler_update(x, model_output, sigma_from, sigma_down, prediction_type)
    x_next = x_next + noise * sigma_up
    return x_next.to(model_output.dtype)


def heun_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    prediction_type: str,
    predictor: tuple[torch.Tensor, torch.Tensor] | None = None,
    clip_sample: float | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Half of one step of Heun's method (Karras et al. 2022, Algorithm 1 with gamma = 0), in the
    dtype of x (diffusers' Heun does not upcast).

    predictor = None: x is at sigma_from; returns the Euler predictor x~ at sigma_to and
    (x, d) for the corrector. Otherwise x is that x~, model_output the model's output at it
    (at sigma_to) and predictor = (x, d): returns x + (d + d~) / 2 (sigma_to - sigma_from), None.
    """
    sigma = sigma_from if predictor is None else sigma_to
    x0 = _x0_from_ve(x, model_output, sigma, prediction_type)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    derivative = (x - x0) / sigma
    if predictor is None:
        return x + derivative * (sigma_to - sigma_from), (x, derivative)
    x_start, first_derivative = predictor
    return x_start + (first_derivative + derivative) / 2 * (sigma_to - sigma_from), None


@dataclass(frozen=True)
class _SigmaSampler:
    """What the samplers that step between VE noise levels share (Euler, Heun, Euler ancestral)."""

    timesteps: torch.Tensor  # float32 [N]: diffusers feeds the UNet float timesteps here
    sigmas: torch.Tensor  # float32 [N + 1]: the VE noise level at each timestep, then 0
    prediction_type: str
    init_noise_sigma: float

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        # The UNet was trained on VP samples: x_VP = x_VE / sqrt(sigma^2 + 1).
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5

    def draws_noise(self, i: int) -> bool:
        return False  # all but Euler ancestral


@dataclass(frozen=True)
class EulerAncestralSampler(_SigmaSampler):
    def draws_noise(self, i: int) -> bool:
        return True

    def step(self, x, model_output, i, state, noise):
        _check_noise(self, i, noise)
        x_next = euler_ancestral_step(x, model_output, self.sigmas[i], self.sigmas[i + 1], self.prediction_type, noise)
        return x_next, None


@dataclass(frozen=True)
class EulerSampler(_SigmaSampler):
    def step(self, x, model_output, i, state, noise):
        _check_noise(self, i, noise)
        return euler_step(x, model_output, self.sigmas[i], self.sigmas[i + 1], self.prediction_type), None


@dataclass(frozen=True)
class HeunSampler(_SigmaSampler):
    """timesteps and sigmas as diffusers lays them out: every step after the first is listed twice,
    t_0, t_1, t_1, ..., t_{N-1}, t_{N-1} (2N - 1 UNet calls) and sigma_0, sigma_1, sigma_1, ...,
    sigma_{N-1}, sigma_{N-1}, 0. Even calls predict, odd calls correct; the last step, to sigma = 0,
    is a plain Euler step (Karras et al. 2022, Algorithm 1, line 6)."""

    clip_sample: float | None = None

    def step(self, x, model_output, i, state, noise):
        """`state` is the predictor's (x, d) between the two calls of a step, else None."""
        _check_noise(self, i, noise)
        predicting = i % 2 == 0
        sigma_from, sigma_to = (self.sigmas[i], self.sigmas[i + 1]) if predicting else (self.sigmas[i - 1], self.sigmas[i])
        return heun_step(x, model_output, sigma_from, sigma_to, self.prediction_type, state, self.clip_sample)


def _discrete_sigmas(
    config: ScheduleConfig, alphas_cumprod: torch.Tensor, num_steps: int, karras: bool
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(timesteps float32 [N], sigmas float32 [N + 1], init_noise_sigma) as diffusers' Euler, Heun
    and LMS schedulers set them: the spacing's timesteps (linspace ones unrounded), their sigmas by
    linear interpolation, and with karras=True the Karras ramp between the first and last of those
    sigmas, each at its fractional timestep."""
    total = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        # diffusers' Euler schedulers keep linspace timesteps unrounded (float32), unlike DDIM.
        timesteps = torch.linspace(0, total - 1, num_steps, dtype=torch.float64).flip(0)
    else:
        timesteps = schedule.inference_timesteps(num_steps, total, config.timestep_spacing, config.steps_offset)
    timesteps = timesteps.to(torch.float32)
    sigma_table = _sigma_table(alphas_cumprod)
    sigmas = _interpolate(sigma_table, timesteps.double())
    if karras:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_steps)
        timesteps = sigma_to_timestep(sigmas, _log_sigma_table(sigma_table)).to(torch.float32)
    sigmas = _append_zero(sigmas)
    sigma_max = sigmas.max()
    # A diffusers quirk kept for parity: with "leading" spacing the initial noise is scaled by
    # sqrt(sigma_max^2 + 1) (unit-variance VP noise seen in VE space), otherwise by sigma_max.
    init_noise_sigma = (sigma_max**2 + 1) ** 0.5 if config.timestep_spacing == "leading" else sigma_max
    return timesteps, sigmas, float(init_noise_sigma)


def _euler_ancestral(config: ScheduleConfig, alphas_cumprod: torch.Tensor, num_steps: int) -> EulerAncestralSampler:
    timesteps, sigmas, init_noise_sigma = _discrete_sigmas(config, alphas_cumprod, num_steps, karras=False)
    return EulerAncestralSampler(timesteps, sigmas, config.prediction_type, init_noise_sigma)


def _euler_or_heun(
    name: str, config: ScheduleConfig, alphas_cumprod: torch.Tensor, num_steps: int, karras: bool
) -> EulerSampler | HeunSampler:
    timesteps, sigmas, init_noise_sigma = _discrete_sigmas(config, alphas_cumprod, num_steps, karras)
    if name == "euler":
        return EulerSampler(timesteps, sigmas, config.prediction_type, init_noise_sigma)
    return HeunSampler(
        timesteps=torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]),
        sigmas=torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]]),
        prediction_type=config.prediction_type,
        init_noise_sigma=init_noise_sigma,
        clip_sample=1.0 if config.clip_sample else None,
    )


# --- LMS ---


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """The linear multistep weights of step i from sigmas[i] to sigmas[i + 1]: weight j is the
    integral over that step of the Lagrange basis polynomial that is 1 at sigmas[i - j] and 0 at
    the other sigmas[i - k], k < order (Adams-Bashforth in sigma; k-diffusion's
    linear_multistep_coeff). The polynomials have degree order - 1 <= 3, which the 2-point
    Gauss-Legendre rule integrates exactly; no quadrature library is needed."""
    if not 1 <= order <= 4 or order > i + 1:
        raise ValueError(f"LMS order must be in [1, min(4, i + 1)], got {order} at step {i}")
    low, high = sigmas[i], sigmas[i + 1]
    half, middle = (high - low) / 2, (high + low) / 2
    nodes = (middle - half / math.sqrt(3), middle + half / math.sqrt(3))

    def basis(j: int, tau: float) -> float:
        product = 1.0
        for k in range(order):
            if k != j:
                product *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return product

    return [half * sum(basis(j, tau) for tau in nodes) for j in range(order)]


def lms_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
    coefficients: Sequence[float],
    derivatives: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One LMS step of the VE sample x at noise level sigma: the ODE derivative d = (x - x0) / sigma
    joins the earlier ones (`derivatives`, oldest first) and x moves by sum_j c_j d_{-j}, with
    coefficients from lms_coefficients (newest first). Returns (x_next, the derivatives kept)."""
    derivatives = (*derivatives, (x - _x0_from_ve(x, model_output, sigma, prediction_type)) / sigma)
    derivatives = derivatives[len(derivatives) - len(coefficients) :]
    return x + sum(c * d for c, d in zip(coefficients, reversed(derivatives))), derivatives


@dataclass(frozen=True)
class LMSSampler(_SigmaSampler):
    coefficients: tuple[tuple[float, ...], ...] = ()  # per step, newest derivative first

    def step(self, x, model_output, i, state, noise):
        """`state` is the last (up to LMS_ORDER - 1) derivatives, None on the first step."""
        _check_noise(self, i, noise)
        return lms_step(x, model_output, self.sigmas[i], self.prediction_type, self.coefficients[i], state or ())


def _lms(config: ScheduleConfig, alphas_cumprod: torch.Tensor, num_steps: int, karras: bool) -> LMSSampler:
    timesteps, sigmas, init_noise_sigma = _discrete_sigmas(config, alphas_cumprod, num_steps, karras)
    values = sigmas.tolist()
    coefficients = tuple(tuple(lms_coefficients(values, i, min(i + 1, LMS_ORDER))) for i in range(num_steps))
    return LMSSampler(timesteps, sigmas, config.prediction_type, init_noise_sigma, coefficients)


# --- PLMS ---


def pndm_transfer(
    x: torch.Tensor, model_output: torch.Tensor, alpha_bar: torch.Tensor, alpha_bar_next: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """PNDM's transfer (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models", eq. 9) of
    x from alpha_bar to alpha_bar_next along the (combined) model output: DDIM with eta = 0,
    written as diffusers' PNDMScheduler writes it. A v output becomes eps with the x it is given."""
    beta, beta_next = 1 - alpha_bar, 1 - alpha_bar_next
    if prediction_type == "v_prediction":
        model_output = (alpha_bar**0.5) * model_output + (beta**0.5) * x
    sample_coeff = (alpha_bar_next / alpha_bar) ** 0.5
    denominator = alpha_bar * beta_next**0.5 + (alpha_bar * beta * alpha_bar_next) ** 0.5
    return sample_coeff * x - (alpha_bar_next - alpha_bar) * model_output / denominator


def plms_output(outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The Adams-Bashforth combination of the last 1-4 model outputs, oldest first (PNDM eq. 12;
    CompVis' p_sample_plms): e, (3e - e1)/2, (23e - 16e1 + 5e2)/12, (55e - 59e1 + 37e2 - 9e3)/24."""
    e = outputs[::-1]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])


@dataclass(frozen=True)
class PLMSSampler(_UnscaledNoDraws):
    """timesteps t_0, t_1, t_1, t_2, ..., t_{N-1} (N + 1 UNet calls): call 0 steps from t_0 with e_0;
    call 1 (at the x it gave, t_1) redoes that step from the same start with (e_0 + e_1)/2 (a
    second-order first step, as CompVis' PLMS); from call 2 on, each call steps with plms_output
    of its own and up to 3 earlier outputs (call 1's is dropped, as diffusers drops it)."""

    timesteps: torch.Tensor  # int64 [N + 1]
    alpha_bars: torch.Tensor  # float32 [N + 1]: alpha_bar each call's transfer starts from
    alpha_bars_next: torch.Tensor  # float32 [N + 1]: alpha_bar it lands on
    prediction_type: str
    init_noise_sigma: float = 1.0

    def step(self, x, model_output, i, state, noise):
        """`state` is (the model outputs kept, the first step's start x), None on the first call."""
        _check_noise(self, i, noise)
        outputs, x_start = state if state is not None else ((), None)
        if i == 1:
            combined, x = (model_output + outputs[-1]) / 2, x_start
        else:
            outputs = (*outputs[-3:], model_output)
            combined = plms_output(outputs)
        x_next = pndm_transfer(x, combined, self.alpha_bars[i], self.alpha_bars_next[i], self.prediction_type)
        return x_next, (outputs, x if i == 0 else None)


def _plms(config: ScheduleConfig, alphas_cumprod: torch.Tensor, num_steps: int) -> PLMSSampler:
    total = config.num_train_timesteps
    steps = schedule.inference_timesteps(num_steps, total, config.timestep_spacing, config.steps_offset)
    timesteps = torch.cat([steps[:1], steps[1:2], steps[1:]])
    # Every transfer goes from t to t - T // N (diffusers' rule for any spacing, as DDIM's), except
    # call 1's, which redoes call 0's: from t_1 + T // N to t_1.
    stride = total // num_steps
    starts, landing = timesteps.clone(), timesteps - stride
    if num_steps > 1:
        starts[1], landing[1] = timesteps[1] + stride, timesteps[1]
    return PLMSSampler(timesteps, *_transfer_alpha_bars(config, alphas_cumprod, starts, landing), config.prediction_type)


# --- DPM-Solver++(2M) ---


def dpmpp_2m_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    prediction_type: str,
    previous_x0: torch.Tensor | None = None,
    sigma_previous: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step of the VP sample x from sigma_from to sigma_to (VE sigmas).

    Returns (x_next, x0): x0 is this step's data prediction, which the next step needs as
    its `previous_x0`. With previous_x0 = None this is the first-order update (DPM-Solver++1,
    which equals DDIM with eta = 0); otherwise the multistep second-order update of Lu et al.
    2022 ("DPM-Solver++"), Algorithm 2, with previous_x0 predicted at sigma_previous. The step
    to sigma_to = 0 must be first order (its h is infinite) and lands on x0.

    With `noise` (a standard normal draw) it is the SDE solver of the same paper (SDE-DPM-Solver++
    2M, midpoint, eta = 1; k-diffusion's sample_dpmpp_2m_sde): x is also shrunk by e^-h, the data
    weight is alpha_to (1 - e^-2h), and sigma_to sqrt(1 - e^-2h) noise is added (none at sigma_to = 0).
    """
    alpha_from, std_from = _vp_coefficients(sigma_from)
    alpha_to, std_to = _vp_coefficients(sigma_to)
    # The data prediction is formed in the sample's dtype, the update in at least float32:
    # the same split as diffusers.
    x0 = schedule.x0_from_output(x, model_output, alpha_from, std_from, prediction_type)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    lambda_from, lambda_to = _log_snr(alpha_from, std_from), _log_snr(alpha_to, std_to)
    h = lambda_to - lambda_from
    # Algorithm 2: x_next = (sigma_to / sigma_from) x - alpha_to (e^-h - 1) D, where D = x0 for
    # the first order, and D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev with r = h_prev / h for 2M.
    if noise is None:
        decay, data_weight = std_to / std_from, alpha_to * (torch.exp(-h) - 1.0)
    else:  # negated, which is exact: the SDE's terms are added in diffusers' order
        decay, data_weight = std_to / std_from * torch.exp(-h), -(alpha_to * (1 - torch.exp(-2.0 * h)))
    x_next = decay * x - data_weight * x0
    if previous_x0 is not None:
        r = (lambda_from - _log_snr(*_vp_coefficients(sigma_previous))) / h
        x_next = x_next - 0.5 * data_weight * ((1.0 / r) * (x0 - previous_x0))
    if noise is not None:
        x_next = x_next + std_to * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
    return x_next.to(model_output.dtype), x0


@dataclass(frozen=True)
class _DPMSolverSchedule(_UnscaledNoDraws):
    """What DPM-Solver++ and UniPC share: their timesteps and sigmas (_dpm_solver_schedule)."""

    timesteps: torch.Tensor  # int64 [N]
    sigmas: torch.Tensor  # float32 [N + 1]: the VE noise level at each step, then 0
    prediction_type: str
    init_noise_sigma: float = 1.0


@dataclass(frozen=True)
class DPMSolverPlusPlus2MSampler(_DPMSolverSchedule):
    def step(self, x, model_output, i, state, noise):
        """`state` is the previous step's x0 prediction (None on the first step)."""
        _check_noise(self, i, noise)
        # First order on the first step (no history yet) and on the last (it ends at sigma = 0).
        first_order = state is None or i == len(self.timesteps) - 1
        previous = (None, None) if first_order else (state, self.sigmas[i - 1])
        return self._update(x, model_output, self.sigmas[i], self.sigmas[i + 1], noise, *previous)

    def _update(self, x, model_output, sigma_from, sigma_to, noise, previous_x0, sigma_previous):
        """noise is None here (the ODE solver) and a draw in DPMSolverPlusPlus2MSDESampler."""
        return dpmpp_2m_step(
            x, model_output, sigma_from, sigma_to, self.prediction_type, previous_x0, sigma_previous, noise
        )


@dataclass(frozen=True)
class DPMSolverPlusPlus2MSDESampler(DPMSolverPlusPlus2MSampler):
    """Draws a float32 standard normal on every step, the last included, as diffusers does."""

    noise_dtype: torch.dtype = torch.float32

    def draws_noise(self, i: int) -> bool:
        return True


def _dpmpp_2m(
    name: str, config: ScheduleConfig, alphas_cumprod: torch.Tensor, num_steps: int, karras: bool
) -> DPMSolverPlusPlus2MSampler:
    timesteps, sigmas = _dpm_solver_schedule(config, alphas_cumprod, num_steps, karras)
    sampler_class = DPMSolverPlusPlus2MSDESampler if name == "dpmpp-2m-sde" else DPMSolverPlusPlus2MSampler
    return sampler_class(timesteps=timesteps, sigmas=sigmas, prediction_type=config.prediction_type)


def _dpm_solver_schedule(
    config: ScheduleConfig, alphas_cumprod: torch.Tensor, num_steps: int, karras: bool, unipc: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps int64 [N], sigmas float32 [N + 1]) as diffusers' DPM-Solver and UniPC set them
    (they differ only in how Karras timesteps are made integers, below)."""
    total, spacing, offset = config.num_train_timesteps, config.timestep_spacing, config.steps_offset
    sigma_table = _sigma_table(alphas_cumprod)
    if karras:
        # The Karras ramp spans the whole schedule whatever the spacing; each step's timestep is
        # where its sigma falls. diffusers rounds it, except DPM-Solver for the cosine schedule,
        # where its cast to int64 truncates (a quirk kept for parity; UniPC rounds always).
        sigmas = karras_sigmas(sigma_table[0].item(), sigma_table[-1].item(), num_steps)
        timesteps = sigma_to_timestep(sigmas, _log_sigma_table(sigma_table))
        if unipc or config.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        timesteps = timesteps.to(torch.int64)
    else:
        if spacing == "trailing":
            timesteps = schedule.inference_timesteps(num_steps, total, spacing, offset)
        else:
            # diffusers' DPM solver spaces N + 1 points and drops the last ("leading": stride T // (N + 1)).
            timesteps = schedule.inference_timesteps(num_steps + 1, total, spacing, offset)[:-1]
        sigmas = _interpolate(sigma_table, timesteps.double())
    return timesteps, _append_zero(sigmas)


# --- UniPC ---


def unipc_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    previous_x0: torch.Tensor | None = None,
    sigma_previous: torch.Tensor | None = None,
    corrector_x0: torch.Tensor | None = None,
) -> torch.Tensor:
    """One UniPC update (Zhao et al. 2023, "UniPC", Algorithm 2, data prediction, B(h) = e^h - 1:
    "bh2") of x at sigma_from (data prediction x0) to sigma_to; previous_x0 is the prediction of
    the step before (at sigma_previous), None for order 1. With h the step in half log-SNR,
    r = (lambda_previous - lambda_from) / h and D1 = (previous_x0 - x0) / r:

    - predictor UniP (corrector_x0 = None): x_next = (sigma_to / sigma_from) x - alpha_to (e^-h - 1) x0
      - alpha_to B(h) rho D1 with rho = 1/2 (order 1, no D1, is DPM-Solver++(1));
    - corrector UniC (corrector_x0: the model's prediction at the predictor's result): the same
      step with rho_1 D1 + rho_c (corrector_x0 - x0), rho solving [[1, 1], [r, 1]] rho = b,
      b_k = h phi_k(h) k! / B(h) (phi_k of -h); order 1: rho_c = 1/2.

    In diffusers' operation order and x's dtype."""
    alpha_from, std_from = _vp_coefficients(sigma_from)
    alpha_to, std_to = _vp_coefficients(sigma_to)
    lambda_from = _log_snr(alpha_from, std_from)
    h = _log_snr(alpha_to, std_to) - lambda_from
    hh = -h
    h_phi_1 = torch.expm1(hh)  # also B(h)
    x_next = std_to / std_from * x - alpha_to * h_phi_1 * x0
    ratio = None if previous_x0 is None else (_log_snr(*_vp_coefficients(sigma_previous)) - lambda_from) / h
    differences = None if previous_x0 is None else ((previous_x0 - x0) / ratio).unsqueeze(1)
    if corrector_x0 is None:
        if differences is None:
            return (x_next - alpha_to * h_phi_1 * 0).to(x.dtype)
        rho = torch.ones(1, dtype=x.dtype) * 0.5
        return (x_next - alpha_to * h_phi_1 * torch.einsum("k,bkc...->bc...", rho, differences)).to(x.dtype)
    correction = 0
    if differences is None:
        rhos = torch.ones(1, dtype=x.dtype) * 0.5
    else:
        h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
        for k in (1, 2):
            b.append(h_phi_k * factorial / h_phi_1)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        ratios = torch.stack([ratio, torch.ones(())])
        R = torch.stack([torch.pow(ratios, 0), torch.pow(ratios, 1)])
        rhos = torch.linalg.solve(R, torch.stack(b)).to(x.dtype)
        correction = torch.einsum("k,bkc...->bc...", rhos[:-1], differences)
    return (x_next - alpha_to * h_phi_1 * (correction + rhos[-1] * (corrector_x0 - x0))).to(x.dtype)


@dataclass(frozen=True)
class UniPCSampler(_DPMSolverSchedule):
    """UniPC-2 with the corrector on every step after the first and order 1 on the first and last
    steps (diffusers' defaults: solver_order 2, lower_order_final, final sigma 0)."""

    def step(self, x, model_output, i, state, noise):
        """`state` is (the sample the last predictor started from, the last two x0 predictions,
        the last predictor's order); None on the first step."""
        _check_noise(self, i, noise)
        sigmas = self.sigmas
        x0 = schedule.x0_from_output(x, model_output, *_vp_coefficients(sigmas[i]), self.prediction_type)
        history = ()
        if state is not None:
            start, history, order = state
            older = (history[-2], sigmas[i - 2]) if order == 2 else (None, None)
            x = unipc_step(start, history[-1], sigmas[i - 1], sigmas[i], *older, corrector_x0=x0)
        history = (*history[-1:], x0)
        order = min(2, len(self.timesteps) - i, i + 1)
        older = (history[-2], sigmas[i - 1]) if order == 2 else (None, None)
        return unipc_step(x, x0, sigmas[i], sigmas[i + 1], *older), (x, history, order)


# --- noise levels ---


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """The N decreasing noise levels of Karras et al. 2022, eq. 5 (float64):
    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    # numpy.linspace's ramp, i / (N - 1) with the last point exactly 1 (torch.linspace rounds
    # differently, enough to move a fractional timestep by an ulp).
    ramp = torch.arange(num_steps, dtype=torch.float64) * (1.0 / max(num_steps - 1, 1))
    ramp[-1] = 1.0 if num_steps > 1 else 0.0
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_timestep(sigmas: torch.Tensor, log_sigma_table: torch.Tensor) -> torch.Tensor:
    """The fractional training timestep of each sigma: linear interpolation in log sigma over
    the schedule's table (float32 [T], increasing with t), clamped to [0, T - 1] (float64)."""
    log_sigmas = sigmas.double().clamp(min=1e-10).log()
    last = log_sigma_table.shape[0] - 1
    low = (torch.searchsorted(log_sigma_table.double(), log_sigmas, right=True) - 1).clamp(0, last - 1)
    low_log, high_log = log_sigma_table[low], log_sigma_table[low + 1]
    weight = ((low_log - log_sigmas) / (low_log - high_log)).clamp(0, 1)
    return (1 - weight) * low + weight * (low + 1)


def _log_sigma_table(sigma_table: torch.Tensor) -> torch.Tensor:
    """log sigma_t in float32, by numpy's float32 log as diffusers takes it (torch's float32 log
    differs from it in the last bit for about a fifth of the entries, which moves the fractional
    Karras timesteps of Euler, Heun and LMS)."""
    return torch.from_numpy(np.log(sigma_table.numpy()))


def _sigma_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The VE noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of every training
    timestep, float32 [T]."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def _interpolate(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The table (indexed by timestep) linearly interpolated at float64 positions in [0, T - 1],
    in float64 with numpy.interp's formula (exact at integer positions)."""
    low = positions.floor().long().clamp(max=table.shape[0] - 2)
    table = table.double()
    return (table[low + 1] - table[low]) * (positions - low) + table[low]


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """The per-step sigmas followed by 0, the noise level after the last step, as float32."""
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def _vp_coefficients(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the VP process x = alpha_t x0 + sigma_t eps at VE noise level
    sigma: alpha_t = 1 / sqrt(sigma^2 + 1) = sqrt(alpha_bar_t), sigma_t = sigma alpha_t."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def _log_snr(alpha: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t), the half log-SNR DPM-Solver steps in."""
    return torch.log(alpha) - torch.log(std)


def _x0_from_ve(x: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The clean sample implied by the model's output at the VE sample x (noise level sigma),
    in the operation order of diffusers' Euler scheduler, which the parity tests hold to the bit."""
    schedule.check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return x - sigma * model_output
    # v = alpha_t eps - sigma_t x0 (VP); with x_VP = x / sqrt(sigma^2 + 1):
    # x0 = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1).
    return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))


def _check_noise(sampler: Sampler, i: int, noise: torch.Tensor | None) -> None:
    """A draw where diffusers makes none (or none where it makes one) would shift every later
    draw of the per-image generators, so the loop must follow `draws_noise` exactly."""
    if sampler.draws_noise(i) and noise is None:
        raise ValueError(f"step {i} of this sampler draws noise: pass a noise tensor")
    if not sampler.draws_noise(i) and noise is not None:
        raise ValueError(f"step {i} of this sampler draws no noise: pass None")
