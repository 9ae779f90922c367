"""Noise schedules and the DDPM/DDIM update rules, as pure functions of tensors.

Notation (Ho et al. 2020, "DDPM"): alpha_bar_t = prod_{s<=t} (1 - beta_s), and the forward
process is x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps. Every function takes the
alpha_bar values it needs as tensors that broadcast against the sample (use `alpha_bar_at`
to gather them per sample), so timesteps may differ across the batch and nothing here holds
a model, a device or a step counter.
"""

import math

import torch

from minidream.config import PREDICTION_TYPES, TIMESTEP_SPACINGS, ScheduleConfig


def make_betas(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Per-step noise variances beta_t, float32, shape [num_train_timesteps]."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if schedule == "scaled_linear":
        # LDM / SD: linear in sqrt(beta).
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008,
        # betas capped at 0.999 to avoid a singularity at t = T.
        def alpha_bar(x: float) -> float:
            return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose one of linear, scaled_linear, squaredcos_cap_v2")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    return torch.cumprod(1.0 - betas, dim=0)


def betas_of(cfg: ScheduleConfig) -> torch.Tensor:
    """The training betas a schedule config describes (zero-terminal-SNR rescaled when it says so)."""
    betas = make_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
    return rescale_zero_terminal_snr(betas) if cfg.rescale_betas_zero_snr else betas


def alphas_cumprod_of(cfg: ScheduleConfig) -> torch.Tensor:
    """alpha_bar_t for every training timestep of a schedule config, float32 [num_train_timesteps]."""
    return alphas_cumprod(betas_of(cfg))


def final_alpha_cumprod(alphas_cumprod: torch.Tensor, set_alpha_to_one: bool) -> torch.Tensor:
    """alpha_bar used for the step after t=0 ("previous" timestep -1).

    SD 1.x uses set_alpha_to_one=False: the last DDIM step lands on alpha_bar_0, not on 1.
    """
    return torch.ones((), dtype=alphas_cumprod.dtype) if set_alpha_to_one else alphas_cumprod[0]


def alpha_bar_at(
    alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor, final: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """alpha_bar for per-sample timesteps t (shape [B] or []), shaped to broadcast against `like`.

    A negative timestep stands for "after the last step" and takes `final`.
    Returns B x 1 x ... x 1 (or a 0-dim tensor for a 0-dim t), in like's dtype and device.
    """
    t = torch.as_tensor(t, device=alphas_cumprod.device)
    values = torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], torch.as_tensor(final, dtype=alphas_cumprod.dtype))
    if values.dim() == 1:
        values = values.reshape(-1, *([1] * (like.dim() - 1)))
    return values.to(device=like.device, dtype=like.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x0) (Ho et al. eq. 4): sqrt(a) x0 + sqrt(1 - a) noise."""
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The velocity v = sqrt(a) noise - sqrt(1 - a) x0 (Salimans & Ho 2022, sec. 4)."""
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet is trained to output for this (x0, noise) pair."""
    check_prediction_type(prediction_type)
    return noise if prediction_type == "epsilon" else v_target(x0, noise, alpha_bar)


def predict_x0(x_t: torch.Tensor, model_output: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The clean sample implied by the model's output at x_t."""
    return x0_from_output(x_t, model_output, alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), prediction_type)


def x0_from_output(
    x_t: torch.Tensor, model_output: torch.Tensor, signal: torch.Tensor, noise_std: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The clean sample implied by the model's output at x_t = signal x0 + noise_std eps
    (signal = sqrt(alpha_bar), noise_std = sqrt(1 - alpha_bar); samplers that work with sigmas
    pass the two they already hold, so no square root is taken twice)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return (x_t - noise_std * model_output) / signal
    return signal * x_t - noise_std * model_output


def predict_eps(x_t: torch.Tensor, model_output: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The noise implied by the model's output at x_t."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return model_output
    return alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * x_t


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Invert the forward process for the noise, given x0."""
    return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()


def ddpm_posterior(
    x_t: torch.Tensor, x0: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_prev | x_t, x0) (Ho et al. eq. 6-7).

    beta_t here is the effective beta between the two timesteps, 1 - alpha_bar_t / alpha_bar_prev,
    so the same formula serves strided (fewer-step) sampling. The variance is the "fixed_small"
    choice beta~_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t.
    """
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    mean = (alpha_bar_prev.sqrt() * beta_t / (1 - alpha_bar_t)) * x0 + (
        alpha_t.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    ) * x_t
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    return mean, variance


def ddpm_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    alpha_bar_prev: torch.Tensor,
    prediction_type: str,
    noise: torch.Tensor | None,
    clip_sample: float | None = None,
) -> torch.Tensor:
    """One ancestral DDPM step x_t -> x_prev.

    `noise` is the standard normal draw for this step; pass None on the last step (t = 0),
    where the reverse process is deterministic. `clip_sample` clamps the predicted x0 to
    [-clip_sample, clip_sample] (pixel-space models; SD 1.x does not clip).
    """
    x0 = predict_x0(x_t, model_output, alpha_bar_t, prediction_type)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    mean, variance = ddpm_posterior(x_t, x0, alpha_bar_t, alpha_bar_prev)
    if noise is None:
        return mean
    # The floor keeps sqrt finite at the last strided step, where the variance is exactly 0.
    return mean + variance.clamp(min=1e-20).sqrt() * noise


def ddim_step(
    x_t: torch.Tensor,
    model_output: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    alpha_bar_prev: torch.Tensor,
    prediction_type: str,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_sample: float | None = None,
) -> torch.Tensor:
    """One DDIM step x_t -> x_prev (Song et al. 2021, eq. 12).

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise, with
    sigma = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) (eq. 16). eta = 0 is the
    deterministic DDIM sampler (noise unused); eta = 1 has DDPM's posterior variance.
    """
    x0 = predict_x0(x_t, model_output, alpha_bar_t, prediction_type)
    eps = predict_eps(x_t, model_output, alpha_bar_t, prediction_type)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    if eta == 0:
        # The deterministic sampler; also valid for a_prev < a_t (inversion, noising along the ODE).
        return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * eps
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs a noise tensor")
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)).sqrt()
    return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).sqrt() * eps + sigma * noise


def inference_timesteps(
    num_inference_steps: int, num_train_timesteps: int, spacing: str, steps_offset: int = 0
) -> torch.Tensor:
    """The descending training timesteps visited by an N-step sampler (int64).

    "leading" (SD 1.x, with steps_offset=1): 0, r, 2r, ... shifted by the offset, r = T // N;
    "trailing": counts down from T - 1 in steps of T / N (rounded), so the first step sees pure noise;
    "linspace": N points evenly spaced over [0, T - 1], rounded.
    (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2.)
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got {num_inference_steps}")
    n, total = num_inference_steps, num_train_timesteps
    if spacing == "leading":
        return (torch.arange(n, dtype=torch.int64) * (total // n) + steps_offset).flip(0)
    if spacing == "trailing":
        # T + i * delta in float64 with numpy arange's delta, (T - T/N) - T, so the rounding
        # matches diffusers; but always exactly N entries (numpy's float arange yields N + 1
        # for some N, e.g. 201, the extra one being -1).
        delta = (total - total / n) - total
        return torch.round(total + torch.arange(n, dtype=torch.float64) * delta).to(torch.int64) - 1
    if spacing == "linspace":
        return torch.round(torch.linspace(0, total - 1, n, dtype=torch.float64)).to(torch.int64).flip(0)
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}")


def ddim_previous_timestep(t: torch.Tensor, num_train_timesteps: int, num_inference_steps: int) -> torch.Tensor:
    """DDIM's previous timestep, t - T // N (negative after the last step).

    This is the rule of the DDIM reference code and of diffusers' DDIMScheduler; it equals the
    next entry of the "leading" timestep list.
    """
    return t - num_train_timesteps // num_inference_steps


def next_in_sequence(timesteps: torch.Tensor) -> torch.Tensor:
    """For each timestep of a descending list, the one visited after it (-1 after the last).

    The DDPM sampler steps between consecutive entries of its list, whatever the spacing.
    """
    return torch.cat([timesteps[1:], timesteps.new_full((1,), -1)])


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; choose one of {', '.join(PREDICTION_TYPES)}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so the last timestep has zero SNR (alpha_bar_T = 0 exactly), the first unchanged.

    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
    shift sqrt(alpha_bar) so its last value is 0, scale it so its first value is what it was,
    then turn it back into betas. SD's schedule otherwise leaves alpha_bar_T = 0.0047, so the model
    never sees pure noise in training yet starts from it at sampling. The paper pairs it with
    v-prediction (epsilon cannot be predicted from pure noise: predict_x0 divides by
    sqrt(alpha_bar_T) = 0), "trailing" spacing (`inference_timesteps`) and guidance rescale.
    Computed in the betas' dtype; returns the same shape and dtype.
    """
    root = alphas_cumprod(betas).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))  # root[-1] becomes 0, root[0] stays `first`
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])  # undo the cumulative product
    return 1 - alphas
