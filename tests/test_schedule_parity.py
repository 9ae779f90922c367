"""The schedule functions against diffusers' DDIMScheduler and DDPMScheduler (SD 1.5 config)."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from minidream.config import ScheduleConfig
from minidream.diffusion import schedule

SD15 = ScheduleConfig()
SHAPE = (2, 4, 8, 6)


def diffusers_config(prediction_type="epsilon", spacing="leading", ddim=True):
    config = dict(
        num_train_timesteps=SD15.num_train_timesteps,
        beta_schedule=SD15.beta_schedule,
        beta_start=SD15.beta_start,
        beta_end=SD15.beta_end,
        steps_offset=SD15.steps_offset,
        set_alpha_to_one=SD15.set_alpha_to_one,
        clip_sample=SD15.clip_sample,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
    )
    if not ddim:  # DDPM always ends on alpha_bar = 1
        del config["set_alpha_to_one"]
    return config


def sd15_alphas_cumprod():
    return schedule.alphas_cumprod(
        schedule.make_betas(SD15.beta_schedule, SD15.num_train_timesteps, SD15.beta_start, SD15.beta_end)
    )


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, t-dependent stand-in for the UNet: smooth, bounded, different per element."""
    t = t.float().reshape(-1, *([1] * (x.dim() - 1))) if t.dim() == 1 else t.float()
    return 0.8 * torch.tanh(x) + 0.1 * torch.cos(x * (1 + t / 1000))


def assert_step_equal(ours, theirs, step):
    scale = max(1.0, theirs.abs().max().item())
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-6 * scale, f"step {step}: max abs diff {diff:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_and_alphas_cumprod_equal_diffusers(name):
    ref = DDPMScheduler(beta_schedule=name, beta_start=0.0001, beta_end=0.02)
    betas = schedule.make_betas(name, 1000, 0.0001, 0.02)
    assert torch.equal(betas, ref.betas)
    assert torch.equal(schedule.alphas_cumprod(betas), ref.alphas_cumprod)


@pytest.mark.parametrize("spacing", schedule.TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps", [1, 10, 50, 250, 1000])
def test_timestep_lists_equal_diffusers(spacing, steps):
    for scheduler_class in (DDIMScheduler, DDPMScheduler):
        ref = scheduler_class(**diffusers_config(spacing=spacing, ddim=scheduler_class is DDIMScheduler))
        ref.set_timesteps(steps)
        assert torch.equal(schedule.inference_timesteps(steps, 1000, spacing, SD15.steps_offset), ref.timesteps)


def test_trailing_timesteps_have_exactly_n_entries_where_diffusers_adds_one():
    """numpy's float arange gives diffusers N + 1 trailing timesteps for some N (e.g. 201);
    ours always has N, equal to diffusers' first N, and diffusers' extra entry is -1."""
    extra = []
    for steps in range(1, 1001):
        ref = DDIMScheduler(**diffusers_config(spacing="trailing"))
        ref.set_timesteps(steps)
        ours = schedule.inference_timesteps(steps, 1000, "trailing")
        assert len(ours) == steps
        assert torch.equal(ours, ref.timesteps[:steps])
        if len(ref.timesteps) > steps:
            assert ref.timesteps[steps:].tolist() == [-1]
            extra.append(steps)
    assert 201 in extra


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_trajectory_equals_diffusers(prediction_type, eta):
    steps = 50
    ref = DDIMScheduler(**diffusers_config(prediction_type))
    ref.set_timesteps(steps)
    ac = sd15_alphas_cumprod()
    final = schedule.final_alpha_cumprod(ac, SD15.set_alpha_to_one)
    timesteps = schedule.inference_timesteps(steps, 1000, "leading", SD15.steps_offset)
    gen = torch.Generator().manual_seed(0)
    ours = theirs = torch.randn(SHAPE, generator=gen)
    for i, t in enumerate(timesteps):
        noise = torch.randn(SHAPE, generator=gen)  # the same draw feeds both
        t_batch = t.expand(SHAPE[0])
        prev = schedule.ddim_previous_timestep(t_batch, 1000, steps)
        ours = schedule.ddim_step(
            ours,
            fake_model(ours, t_batch),
            schedule.alpha_bar_at(ac, t_batch, ours),
            schedule.alpha_bar_at(ac, prev, ours, final),
            prediction_type,
            eta=eta,
            noise=noise,
        )
        theirs = ref.step(fake_model(theirs, t), t, theirs, eta=eta, variance_noise=noise).prev_sample
        assert_step_equal(ours, theirs, i)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_trajectory_over_1000_steps_equals_diffusers(prediction_type):
    # Without set_timesteps diffusers runs the full chain 999, 998, ..., 0 (Ho et al. Algorithm 2).
    ref = DDPMScheduler(**diffusers_config(prediction_type, ddim=False))
    ac = sd15_alphas_cumprod()
    timesteps = schedule.inference_timesteps(1000, 1000, "leading", 0)
    assert torch.equal(timesteps, ref.timesteps)
    # diffusers draws each step's noise from its generator; ours draws the same sequence.
    ref_gen = torch.Generator().manual_seed(1)
    our_gen = torch.Generator().manual_seed(1)
    ours = theirs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    for i, (t, prev) in enumerate(zip(timesteps, schedule.next_in_sequence(timesteps))):
        t_batch = t.expand(SHAPE[0])
        noise = torch.randn(SHAPE, generator=our_gen) if t > 0 else None
        ours = schedule.ddpm_step(
            ours,
            fake_model(ours, t_batch),
            schedule.alpha_bar_at(ac, t_batch, ours),
            schedule.alpha_bar_at(ac, prev.expand(SHAPE[0]), ours, final=1.0),
            prediction_type,
            noise,
        )
        theirs = ref.step(fake_model(theirs, t), t, theirs, generator=ref_gen).prev_sample
        assert_step_equal(ours, theirs, i)


def test_ddpm_strided_trajectory_equals_diffusers():
    """Fewer steps: DDPM steps between consecutive list entries with the effective beta."""
    ref = DDPMScheduler(**diffusers_config(ddim=False))
    ref.set_timesteps(25)
    ac = sd15_alphas_cumprod()
    timesteps = schedule.inference_timesteps(25, 1000, "leading", SD15.steps_offset)
    ref_gen, our_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ours = theirs = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    for i, (t, prev) in enumerate(zip(timesteps, schedule.next_in_sequence(timesteps))):
        noise = torch.randn(SHAPE, generator=our_gen) if t > 0 else None
        ours = schedule.ddpm_step(
            ours, fake_model(ours, t), schedule.alpha_bar_at(ac, t, ours), schedule.alpha_bar_at(ac, prev, ours), "epsilon", noise
        )
        theirs = ref.step(fake_model(theirs, t), t, theirs, generator=ref_gen).prev_sample
        assert_step_equal(ours, theirs, i)


def test_add_noise_and_v_target_equal_diffusers():
    ref = DDPMScheduler(**diffusers_config("v_prediction", ddim=False))
    ac = sd15_alphas_cumprod()
    gen = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    t = torch.tensor([0, 999])
    a = schedule.alpha_bar_at(ac, t, x0)
    torch.testing.assert_close(schedule.add_noise(x0, noise, a), ref.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.v_target(x0, noise, a), ref.get_velocity(x0, noise, t), atol=1e-6, rtol=0)
