"""The composed training recipe (training/recipe.py): the plain recipe is unchanged, the per-sample
draws do not depend on the batch, and the weights apply per sample before the instance/class split."""

import pytest
import torch
from host_reads import HostReads
from plain_recipe import noise_and_timesteps, noisy_latents

from minidream.config import ScheduleConfig, TrainSection
from minidream.diffusion import loss_weighting as lw
from minidream.diffusion import schedule
from minidream.training.order import sample_generator
from minidream.training.recipe import (
    Recipe,
    draw_noise,
    noisy_latents_and_target,
    recipe_loss,
    sample_losses,
)

ALPHAS_CUMPROD = schedule.alphas_cumprod(schedule.make_betas("scaled_linear", 1000, 0.00085, 0.012))
SHAPE = (4, 8, 8)
PLAIN = Recipe.from_config(TrainSection(), ScheduleConfig())
FULL = Recipe.from_config(
    TrainSection(snr_gamma=5.0, noise_offset=0.1, input_perturbation=0.1, loss="huber", min_timestep=100, max_timestep=900),
    ScheduleConfig(prediction_type="v_prediction"),
)


def generators(positions, seed: int = 3) -> list[torch.Generator]:
    return [sample_generator(seed, 0, position, part) for position, part in positions]


BATCH = [(0, 0), (1, 0), (0, 1), (1, 1)]  # two instance samples, then their two class samples
CPU = torch.device("cpu")


def test_from_config_resolves_the_timestep_range():
    assert (PLAIN.min_timestep, PLAIN.max_timestep, PLAIN.prediction_type) == (0, 1000, "epsilon")
    assert (FULL.min_timestep, FULL.max_timestep, FULL.prediction_type) == (100, 900, "v_prediction")


def test_plain_recipe_draws_and_losses_are_the_step_functions():
    noise, input_noise, t = draw_noise(SHAPE, generators(BATCH), PLAIN, CPU)
    ref_noise, ref_t = noise_and_timesteps(SHAPE, generators(BATCH), 1000)
    assert torch.equal(noise, ref_noise) and torch.equal(t, ref_t) and input_noise is noise
    latents = torch.randn(4, *SHAPE)
    noisy, target = noisy_latents_and_target(latents, noise, input_noise, t, ALPHAS_CUMPROD, PLAIN)
    ref_noisy, ref_target = noisy_latents(latents, noise, t, ALPHAS_CUMPROD, "epsilon")
    assert torch.equal(noisy, ref_noisy) and torch.equal(target, ref_target)
    prediction = torch.randn(4, *SHAPE)
    total, instance, prior, _ = recipe_loss(prediction, target, t, ALPHAS_CUMPROD, PLAIN, 2, 0.7)
    errors = (prediction - target) ** 2  # Ruiz et al. eq. 2: the means over every element
    assert torch.equal(instance, errors[:2].mean()) and torch.equal(prior, errors[2:].mean())
    assert torch.equal(total, errors[:2].mean() + 0.7 * errors[2:].mean())


def test_prior_preservation_loss_is_the_hand_computed_two_term_mse():
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    loss, loss_instance, loss_prior, _ = recipe_loss(prediction, target, None, ALPHAS_CUMPROD, PLAIN, 2, 0.7)
    by_hand_instance = sum(((prediction[i] - target[i]) ** 2).sum() for i in (0, 1)) / (2 * 4 * 8 * 8)
    by_hand_prior = sum(((prediction[i] - target[i]) ** 2).sum() for i in (2, 3)) / (2 * 4 * 8 * 8)
    torch.testing.assert_close(loss_instance, by_hand_instance)
    torch.testing.assert_close(loss_prior, by_hand_prior)
    torch.testing.assert_close(loss, by_hand_instance + 0.7 * by_hand_prior)


def test_the_plain_loss_without_class_samples_is_plain_mse_and_fp32():
    g = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(2, 4, 4, 4, generator=g).bfloat16(), torch.randn(2, 4, 4, 4, generator=g)
    loss, _, loss_prior, _ = recipe_loss(prediction, target, None, ALPHAS_CUMPROD, PLAIN, 2, 1.0)
    assert loss.dtype == torch.float32 and float(loss_prior) == 0.0
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(prediction.float(), target))


@pytest.mark.parametrize("recipe", [PLAIN, FULL], ids=["plain", "full"])
@pytest.mark.parametrize("masked", [False, True])
def test_the_per_sample_losses_are_each_instance_samples_own_bit_for_bit(recipe, masked):
    """The per-subject sums reuse them: they must equal the recipe's loss of each instance sample
    computed alone, as metrics.jsonl's loss/<name> always was."""
    noise, _, t = draw_noise(SHAPE, generators(BATCH), recipe, CPU)
    prediction, target = torch.randn(4, *SHAPE, requires_grad=True), torch.randn(4, *SHAPE)
    mask = torch.rand(4, 1, *SHAPE[1:]) if masked else None
    losses = recipe_loss(prediction, target, t, ALPHAS_CUMPROD, recipe, 2, 0.7, mask)
    alone = sample_losses(prediction.detach()[:2], target[:2], t[:2], ALPHAS_CUMPROD, recipe, mask[:2] if masked else None)
    assert torch.equal(losses.per_sample, alone) and not losses.per_sample.requires_grad


def test_each_sample_draws_the_same_in_any_batch():
    """Two ranks holding two samples each draw what one process holding all four draws."""
    full = draw_noise(SHAPE, generators(BATCH), FULL, CPU)
    halves = [draw_noise(SHAPE, generators(BATCH[i : i + 2]), FULL, CPU) for i in (0, 2)]
    for k in range(3):
        assert torch.equal(full[k], torch.cat([halves[0][k], halves[1][k]]))
    noise, input_noise, t = full
    assert torch.all((t >= 100) & (t < 900))
    assert not torch.equal(noise, input_noise)


def test_input_noise_makes_x_t_and_the_target_keeps_the_noise():
    noise, input_noise, t = draw_noise(SHAPE, generators(BATCH), FULL, CPU)
    latents = torch.randn(4, *SHAPE)
    noisy, target = noisy_latents_and_target(latents, noise, input_noise, t, ALPHAS_CUMPROD, FULL)
    a = schedule.alpha_bar_at(ALPHAS_CUMPROD, t, latents)
    torch.testing.assert_close(noisy, a.sqrt() * latents + (1 - a).sqrt() * input_noise, rtol=0, atol=0)
    torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * latents, rtol=0, atol=0)  # v from the unperturbed noise


def test_weights_apply_per_sample_before_the_instance_class_split():
    noise, _, t = draw_noise(SHAPE, generators(BATCH), FULL, CPU)
    prediction, target = torch.randn(4, *SHAPE), torch.randn(4, *SHAPE)
    total, instance, prior, _ = recipe_loss(prediction, target, t, ALPHAS_CUMPROD, FULL, 2, 0.7)
    c = lw.huber_c_schedule("snr", 0.1, t, ALPHAS_CUMPROD, 1000).view(4, 1, 1, 1).double()
    d = prediction.double() - target.double()
    per_sample = (2 * c * (torch.sqrt(d**2 + c**2) - c)).mean(dim=(1, 2, 3))
    snr = ALPHAS_CUMPROD.double()[t] / (1 - ALPHAS_CUMPROD.double()[t])
    weighted = per_sample * torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)
    torch.testing.assert_close(instance.double(), weighted[:2].mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(prior.double(), weighted[2:].mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(total.double(), weighted[:2].mean() + 0.7 * weighted[2:].mean(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("loss", ["mse", "huber", "smooth_l1"])
def test_without_class_samples_the_prior_loss_is_zero(loss):
    recipe = Recipe.from_config(TrainSection(snr_gamma=5.0, loss=loss), ScheduleConfig())
    t = torch.tensor([10, 500, 990])
    total, instance, prior, _ = recipe_loss(torch.randn(3, *SHAPE), torch.randn(3, *SHAPE), t, ALPHAS_CUMPROD, recipe, 3, 1.0)
    assert torch.equal(total, instance) and prior.item() == 0.0


def test_the_loss_reads_nothing_on_the_host():
    noise, _, t = draw_noise(SHAPE, generators(BATCH), FULL, CPU)
    prediction, target = torch.randn(4, *SHAPE), torch.randn(4, *SHAPE)
    with HostReads() as reads:
        recipe_loss(prediction, target, t, ALPHAS_CUMPROD, FULL, 2, 1.0)
    assert reads.count == 0
