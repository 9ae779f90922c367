"""The optimizer step (training/step.py): LR schedules, skipping a non-finite update, clipping."""

import math

import pytest
import torch

from minidream.training.optimizers import FusedBackward
from minidream.training.step import lr_factor, optimizer_step, step_unless


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


def test_optimizer_step_clips_steps_and_zeroes_or_skips_a_non_finite_step():
    """One call after the backward passes: the global norm measured before clipping, the gradients
    clipped to max_grad_norm, AdamW's step, the gradients freed; a NaN gradient skips the step."""
    start = torch.randn(6, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(6, generator=torch.Generator().manual_seed(1)) * 10
    weight, twin = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizer, reference = (torch.optim.AdamW([w], lr=0.1, fused=True) for w in (weight, twin))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    weight.grad, twin.grad = grad.clone(), grad.clone()
    grad_norm, skip = optimizer_step(optimizer, scaler, 1.0, sharded=False)
    torch.nn.utils.clip_grad_norm_([twin], 1.0)
    reference.step()
    assert torch.equal(grad_norm, grad.norm()) and not skip
    assert torch.equal(weight.detach(), twin.detach()) and weight.grad is None
    weight.grad = torch.full((6,), float("nan"))
    _, skip = optimizer_step(optimizer, scaler, 1.0, sharded=False)
    assert skip and torch.equal(weight.detach(), twin.detach())


def test_optimizer_step_after_a_fused_backward_reports_its_skip_and_no_norm():
    weight = torch.nn.Parameter(torch.ones(3))
    fused = FusedBackward([{"params": [weight], "lr": 0.1}], lambda groups: torch.optim.AdamW(groups, fused=True))
    (weight * torch.tensor([1.0, float("nan"), 1.0])).sum().backward()  # this backward is the step
    grad_norm, skip = optimizer_step(fused, torch.amp.GradScaler("cpu", enabled=False), None, sharded=False)
    assert math.isnan(grad_norm) and skip and not fused.nonfinite  # the flag is reset for the next step
