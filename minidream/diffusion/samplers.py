"""The samplers `sample.py` offers, each matched step for step to its diffusers scheduler.

ddim       DDIM (Song et al. 2021), eta configurable (0 = deterministic)   ~ DDIMScheduler
ddpm       ancestral DDPM (Ho et al. 2020), strided                         ~ DDPMScheduler
euler-a    Euler ancestral (k-diffusion's sample_euler_ancestral)          ~ EulerAncestralDiscreteScheduler
dpmpp-2m   DPM-Solver++(2M) (Lu et al. 2022), optionally Karras sigmas      ~ DPMSolverMultistepScheduler

The math of each update is a pure function of tensors (`minidream.diffusion.schedule.ddim_step`,
`schedule.ddpm_step`, `euler_ancestral_step`, `dpmpp_2m_step`). `make_sampler` wraps one of
them in a small frozen object that holds the precomputed schedule of one run; the caller
owns the loop, the step index and the random draws:

    sampler = make_sampler("euler-a", schedule_config, num_steps=25)
    x = noise * sampler.init_noise_sigma
    state = None
    for i, t in enumerate(sampler.timesteps):
        model_output = unet(sampler.scale_model_input(x, i), t, context)
        noise = draw_per_image_noise() if sampler.draws_noise(i) else None
        x, state = sampler.step(x, model_output, i, state, noise)

Euler ancestral and DPM-Solver++ are written with the noise level of Karras et al. 2022,
sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t): the SD (variance-preserving) sample x_VP is
the variance-exploding x_VE = x0 + sigma_t eps scaled by sqrt(alpha_bar_t).

Schedule constants stay float32 CPU tensors and enter the update as 0-dim tensors, in the
order and dtypes diffusers uses, so the numbers agree with diffusers in every dtype.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from minidream.config import SAMPLERS, ScheduleConfig
from minidream.diffusion import schedule

KARRAS_RHO = 7.0  # Karras et al. 2022, sec. 3: rho = 7 balances the step sizes over sigma


class Sampler(Protocol):
    """What the sampling loop uses; every sampler below provides it and holds nothing mutable."""

    timesteps: torch.Tensor  # [N], on the CPU: the t given to the UNet at step i
    init_noise_sigma: float  # the initial latents are randn * init_noise_sigma

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
    if karras and name != "dpmpp-2m":
        raise ValueError(f"karras sigmas apply only to the dpmpp-2m sampler, not {name}")


def make_sampler(
    name: str, schedule_config: ScheduleConfig, num_steps: int, eta: float = 0.0, karras: bool = False
) -> Sampler:
    """The sampler `name` for an N-step run, configured as a diffusers pipeline configures
    `XScheduler.from_config(config)` from the same schedule config."""
    check_sampler_options(name, eta, karras)
    schedule.check_prediction_type(schedule_config.prediction_type)
    total = schedule_config.num_train_timesteps
    if not 1 <= num_steps < total:
        raise ValueError(f"num_steps must be in [1, {total - 1}], got {num_steps}")

    alphas_cumprod = schedule.alphas_cumprod_of(schedule_config)
    spacing, offset = schedule_config.timestep_spacing, schedule_config.steps_offset
    if name == "ddim":
        sampler = _ddim(schedule_config, alphas_cumprod, num_steps, eta)
    elif name == "ddpm":
        sampler = _ddpm(schedule_config, alphas_cumprod, num_steps)
    elif name == "euler-a":
        sampler = _euler_ancestral(schedule_config, alphas_cumprod, num_steps)
    else:
        sampler = _dpmpp_2m(schedule_config, alphas_cumprod, num_steps, karras)
    if sampler.timesteps.max() >= total:
        raise ValueError(
            f"{num_steps} steps with {spacing!r} spacing and steps_offset {offset} reach timestep "
            f"{int(sampler.timesteps.max())} >= {total}; use fewer steps"
        )
    return sampler


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
    final = schedule.final_alpha_cumprod(alphas_cumprod, config.set_alpha_to_one)
    return DDIMSampler(
        timesteps=timesteps,
        alpha_bars=alphas_cumprod[timesteps],
        alpha_bars_next=schedule.alpha_bar_at(alphas_cumprod, landing, alphas_cumprod, final),
        prediction_type=config.prediction_type,
        eta=eta,
        clip_sample=1.0 if config.clip_sample else None,
    )


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
    DDPM's posterior variance; then one Euler step of the probability-flow ODE
    dx/dsigma = (x - x0) / sigma (Karras et al. 2022, eqs. 1 and 3 with sigma(t) = t) goes to
    sigma_down, and sigma_up * noise is added. sigma_to = 0 lands on the predicted x0.
    Computed in at least float32 (as diffusers upcasts), returned in model_output's dtype.
    """
    if noise is None:
        raise ValueError("euler_ancestral_step needs a noise tensor on every step")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    x0 = _x0_from_ve(x, model_output, sigma_from, prediction_type)
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    derivative = (x - x0) / sigma_from
    x_next = x + derivative * (sigma_down - sigma_from)
    x_next = x_next + noise * sigma_up
    return x_next.to(model_output.dtype)


@dataclass(frozen=True)
class EulerAncestralSampler:
    timesteps: torch.Tensor  # float32 [N]: diffusers feeds the UNet float timesteps here
    sigmas: torch.Tensor  # float32 [N + 1]: the VE noise level at each timestep, then 0
    prediction_type: str
    init_noise_sigma: float

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        # The UNet was trained on VP samples: x_VP = x_VE / sqrt(sigma^2 + 1).
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5

    def draws_noise(self, i: int) -> bool:
        return True

    def step(self, x, model_output, i, state, noise):
        _check_noise(self, i, noise)
        x_next = euler_ancestral_step(x, model_output, self.sigmas[i], self.sigmas[i + 1], self.prediction_type, noise)
        return x_next, None


def _euler_ancestral(config: ScheduleConfig, alphas_cumprod: torch.Tensor, num_steps: int) -> EulerAncestralSampler:
    total = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        # diffusers' Euler schedulers keep linspace timesteps unrounded (float32), unlike DDIM.
        timesteps = torch.linspace(0, total - 1, num_steps, dtype=torch.float64).flip(0).to(torch.float32)
    else:
        timesteps = schedule.inference_timesteps(num_steps, total, config.timestep_spacing, config.steps_offset)
        timesteps = timesteps.to(torch.float32)
    sigmas = _append_zero(_interpolate(_sigma_table(alphas_cumprod), timesteps.double()))
    sigma_max = sigmas.max()
    # A diffusers quirk kept for parity: with "leading" spacing the initial noise is scaled by
    # sqrt(sigma_max^2 + 1) (unit-variance VP noise seen in VE space), otherwise by sigma_max.
    init_noise_sigma = (sigma_max**2 + 1) ** 0.5 if config.timestep_spacing == "leading" else sigma_max
    return EulerAncestralSampler(
        timesteps=timesteps, sigmas=sigmas, prediction_type=config.prediction_type, init_noise_sigma=float(init_noise_sigma)
    )


# --- DPM-Solver++(2M) ---


def dpmpp_2m_step(
    x: torch.Tensor,
    model_output: torch.Tensor,
    sigma_from: torch.Tensor,
    sigma_to: torch.Tensor,
    prediction_type: str,
    previous_x0: torch.Tensor | None = None,
    sigma_previous: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step of the VP sample x from sigma_from to sigma_to (VE sigmas).

    Returns (x_next, x0): x0 is this step's data prediction, which the next step needs as
    its `previous_x0`. With previous_x0 = None this is the first-order update (DPM-Solver++1,
    which equals DDIM with eta = 0); otherwise the multistep second-order update of Lu et al.
    2022 ("DPM-Solver++"), Algorithm 2, with previous_x0 predicted at sigma_previous. The step
    to sigma_to = 0 must be first order (its h is infinite) and lands on x0.
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
    data_weight = alpha_to * (torch.exp(-h) - 1.0)
    x_next = (std_to / std_from) * x - data_weight * x0
    if previous_x0 is not None:
        r = (lambda_from - _log_snr(*_vp_coefficients(sigma_previous))) / h
        x_next = x_next - 0.5 * data_weight * ((1.0 / r) * (x0 - previous_x0))
    return x_next.to(model_output.dtype), x0


@dataclass(frozen=True)
class DPMSolverPlusPlus2MSampler:
    timesteps: torch.Tensor  # int64 [N]
    sigmas: torch.Tensor  # float32 [N + 1]: the VE noise level at each step, then 0
    prediction_type: str
    init_noise_sigma: float = 1.0

    def scale_model_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x

    def draws_noise(self, i: int) -> bool:
        return False

    def step(self, x, model_output, i, state, noise):
        """`state` is the previous step's x0 prediction (None on the first step)."""
        _check_noise(self, i, noise)
        # First order on the first step (no history yet) and on the last (it ends at sigma = 0).
        first_order = state is None or i == len(self.timesteps) - 1
        return dpmpp_2m_step(
            x,
            model_output,
            self.sigmas[i],
            self.sigmas[i + 1],
            self.prediction_type,
            previous_x0=None if first_order else state,
            sigma_previous=None if first_order else self.sigmas[i - 1],
        )


def _dpmpp_2m(
    config: ScheduleConfig, alphas_cumprod: torch.Tensor, num_steps: int, karras: bool
) -> DPMSolverPlusPlus2MSampler:
    total, spacing, offset = config.num_train_timesteps, config.timestep_spacing, config.steps_offset
    sigma_table = _sigma_table(alphas_cumprod)
    if karras:
        # The Karras ramp spans the whole schedule whatever the spacing; each step's timestep is
        # where its sigma falls. diffusers rounds it, except for the cosine schedule, where its
        # cast to int64 truncates (a quirk kept for parity).
        sigmas = karras_sigmas(sigma_table[0].item(), sigma_table[-1].item(), num_steps)
        timesteps = sigma_to_timestep(sigmas, sigma_table.log())
        if config.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        timesteps = timesteps.to(torch.int64)
    else:
        if spacing == "trailing":
            timesteps = schedule.inference_timesteps(num_steps, total, spacing, offset)
        else:
            # diffusers' DPM solver spaces N + 1 points and drops the last ("leading": stride T // (N + 1)).
            timesteps = schedule.inference_timesteps(num_steps + 1, total, spacing, offset)[:-1]
        sigmas = _interpolate(sigma_table, timesteps.double())
    return DPMSolverPlusPlus2MSampler(
        timesteps=timesteps, sigmas=_append_zero(sigmas), prediction_type=config.prediction_type
    )


# --- noise levels ---


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = KARRAS_RHO) -> torch.Tensor:
    """The N decreasing noise levels of Karras et al. 2022, eq. 5 (float64):
    sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
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
