"""The pieces of a DreamBooth step: the split loss, the data order, noise keys, LR schedule,
skipping a non-finite update."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from plain_recipe import noise_and_timesteps

from minidream.training.step import (
    Cursor,
    dreambooth_loss,
    lr_factor,
    sample_generator,
    step_unless,
    take_items,
)


def test_prior_preservation_loss_is_the_hand_computed_two_term_mse():
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    loss, loss_instance, loss_prior = dreambooth_loss(prediction, target, num_instance=2, prior_loss_weight=0.7)
    by_hand_instance = sum(((prediction[i] - target[i]) ** 2).sum() for i in (0, 1)) / (2 * 4 * 8 * 8)
    by_hand_prior = sum(((prediction[i] - target[i]) ** 2).sum() for i in (2, 3)) / (2 * 4 * 8 * 8)
    torch.testing.assert_close(loss_instance, by_hand_instance)
    torch.testing.assert_close(loss_prior, by_hand_prior)
    torch.testing.assert_close(loss, by_hand_instance + 0.7 * by_hand_prior)


def test_loss_without_class_samples_is_plain_mse_and_fp32():
    g = torch.Generator().manual_seed(1)
    prediction, target = torch.randn(2, 4, 4, 4, generator=g).bfloat16(), torch.randn(2, 4, 4, 4, generator=g)
    loss, loss_instance, loss_prior = dreambooth_loss(prediction, target, num_instance=2, prior_loss_weight=1.0)
    assert loss.dtype == torch.float32 and float(loss_prior) == 0.0
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(prediction.float(), target))


@given(st.integers(1, 10), st.integers(1, 4), st.integers(1, 3), st.integers(0, 5))
def test_ranks_in_lockstep_take_what_one_process_takes_with_the_global_batch(per_rank, world, batch, seed):
    """W ranks taking B items each per step see exactly the items (and keys) one process taking
    W*B sees, epoch after epoch: the basis of N-process == 1-process training."""
    length = per_rank * world
    if per_rank < batch:
        with pytest.raises(ValueError, match="cannot give"):
            take_items(Cursor(), batch, length, seed, 0, world)
        return
    cursors, single = [Cursor()] * world, Cursor()
    for _ in range(7):
        taken = []
        for rank in range(world):
            items, cursors[rank] = take_items(cursors[rank], batch, length, seed, rank, world)
            taken += items
        expected, single = take_items(single, world * batch, length, seed, 0, 1)
        assert sorted(taken, key=lambda i: i.position) == sorted(expected, key=lambda i: i.position)


def test_cursor_moves_to_the_next_epoch_when_the_shard_runs_out():
    cursor, seen = Cursor(), []
    for _ in range(5):
        items, cursor = take_items(cursor, 2, 5, seed=3, rank=0, world_size=1)
        seen.append([(i.epoch, i.index) for i in items])
    assert [e for batch in seen for e, _ in batch] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    first_epoch = {i for batch in seen[:2] for e, i in batch}
    assert len(first_epoch) == 4  # 5 items, batches of 2: the fifth waits for a later epoch


def test_sample_noise_depends_only_on_its_key():
    a = noise_and_timesteps((4, 2, 2), [sample_generator(0, 1, 5, 0), sample_generator(0, 1, 6, 0)], 1000)
    b = noise_and_timesteps((4, 2, 2), [sample_generator(0, 1, 6, 0)], 1000)
    assert torch.equal(a[0][1:], b[0]) and torch.equal(a[1][1:], b[1])
    c = noise_and_timesteps((4, 2, 2), [sample_generator(0, 1, 6, 1)], 1000)
    assert not torch.equal(b[0], c[0])


def test_lr_schedules():
    assert [lr_factor(s, "constant", 4, 100) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(4, "linear", 4, 104) == 1.0 and lr_factor(54, "linear", 4, 104) == 0.5
    assert lr_factor(104, "linear", 4, 104) == 0.0
    assert math.isclose(lr_factor(54, "cosine", 4, 104), 0.5) and lr_factor(104, "cosine", 4, 104) == 0.0
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_factor(10, "step", 0, 100)


@pytest.mark.parametrize("fused", [True, False])
def test_step_unless_skips_the_whole_update_or_makes_the_plain_one(fused):
    """A skipped step leaves weights, moments and the step count as they were, so the next
    update is AdamW's first, bit for bit; a step that is not skipped is optimizer.step()."""
    def optimizer_for(weight):
        return torch.optim.AdamW([weight], lr=0.1, weight_decay=0.01, fused=fused)

    start = torch.randn(5, generator=torch.Generator().manual_seed(0))
    grads = [torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    skipping, plain = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_skipping, opt_plain = optimizer_for(skipping), optimizer_for(plain)

    skipping.grad = torch.full((5,), float("nan"))
    step_unless(opt_skipping, torch.tensor(True))
    assert torch.equal(skipping.detach(), start)
    for grad in grads:
        skipping.grad, plain.grad = grad.clone(), grad.clone()
        step_unless(opt_skipping, torch.tensor(False))
        opt_plain.step()
        assert torch.equal(skipping.detach(), plain.detach())
    assert float(opt_skipping.state[skipping]["step"]) == 2
    assert torch.equal(opt_skipping.state[skipping]["exp_avg_sq"], opt_plain.state[plain]["exp_avg_sq"])
    assert not hasattr(opt_skipping, "found_inf")
