"""The optimizer factory and the fused back pass (training/optimizers.py)."""

import sys

import pytest
import torch
from torch import nn

from minidream.config import TrainSection
from minidream.training.optimizers import FusedBackward, OptimizerError, make_optimizer


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))


def groups(m: nn.Module) -> list[dict]:
    """Two groups with different learning rates, as the UNet and text encoder have."""
    params = list(m.parameters())
    return [{"params": params[:4], "lr": 1e-2}, {"params": params[4:], "lr": 3e-3}]


def batch(step: int) -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(step))


def adamw(param_groups):
    return make_optimizer(param_groups, TrainSection())


def test_adamw_is_torchs_fused_adamw_with_the_settings():
    opt = make_optimizer(groups(model()), TrainSection(adam_beta1=0.8, adam_beta2=0.99, adam_eps=1e-6, weight_decay=0.1))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 3e-3]
    assert opt.defaults["betas"] == (0.8, 0.99) and opt.defaults["eps"] == 1e-6 and opt.defaults["weight_decay"] == 0.1


def test_adamw8bit_without_bitsandbytes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(OptimizerError) as error:
        make_optimizer(groups(model()), TrainSection(optimizer="adamw8bit"))
    assert str(error.value) == "train.optimizer=adamw8bit needs the bitsandbytes package: pip install bitsandbytes"


def test_unknown_optimizer_lists_the_choices():
    with pytest.raises(OptimizerError, match="unknown train.optimizer 'sgd'; choose one of adamw, adamw8bit, prodigy, lion, "):
        make_optimizer(groups(model()), TrainSection(optimizer="sgd"))


def train_plain(m: nn.Module, steps: int, factors: list[float]) -> torch.optim.Optimizer:
    opt = adamw(groups(m))
    base = [g["lr"] for g in opt.param_groups]
    for step in range(steps):
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * factors[step]
        m(batch(step)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


def train_fused(m: nn.Module, steps: int, factors: list[float]) -> FusedBackward:
    fused = FusedBackward(groups(m), adamw)
    for step in range(steps):
        fused.set_lr_factor(factors[step])
        m(batch(step)).square().mean().backward()
    return fused


def test_fused_backward_gives_the_weights_and_moments_of_a_normal_step():
    """Fused AdamW's per-element update does not depend on which tensors share the kernel: bit for bit."""
    factors = [1.0, 0.5, 0.25, 1.0]
    plain, fused = model(), model()
    opt = train_plain(plain, 4, factors)
    fb = train_fused(fused, 4, factors)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        assert torch.equal(a, b), name
        assert b.grad is None  # freed inside backward
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][key], fb.optimizers[b].state[b][key]), (name, key)
    assert not fb.nonfinite.item()


def test_gradients_never_all_exist_at_once():
    m = model()
    fused = FusedBackward(groups(m), adamw)
    params = list(m.parameters())
    alive = []
    for p in params:  # registered after FusedBackward's hooks: runs once p has been stepped and freed
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    m(batch(0)).square().mean().backward()
    assert len(alive) == len(params) and max(alive) <= 1
    fused.remove()


def test_a_non_finite_gradient_skips_only_that_parameter():
    m, reference = model(), model()
    fused = FusedBackward(groups(m), adamw)
    before = [p.detach().clone() for p in m.parameters()]
    last_bias = m[4].bias
    (m(batch(0)).square().mean() + (last_bias * float("nan")).sum()).backward()
    assert fused.nonfinite.item()
    for p, old in zip(m.parameters(), before):
        assert torch.equal(p, old) == (p is last_bias)
    assert "step" not in fused.optimizers[last_bias].state or fused.optimizers[last_bias].state[last_bias]["step"].item() == 0
    fused.reset_nonfinite()
    assert not fused.nonfinite.item()
    # The other parameters took the normal step.
    train_plain(reference, 1, [1.0])
    for (name, a), b in zip(reference.named_parameters(), m.parameters()):
        if b is not last_bias:
            assert torch.equal(a, b), name


def test_state_dict_round_trip_continues_bit_identically():
    factors = [1.0] * 4
    uninterrupted = model()
    train_fused(uninterrupted, 4, factors)
    first = model()
    fb = train_fused(first, 2, factors)
    state = fb.state_dict()
    fb.remove()
    second = model()
    with torch.no_grad():
        for p, q in zip(second.parameters(), first.parameters()):
            p.copy_(q)
    resumed = FusedBackward(groups(second), adamw)
    resumed.load_state_dict(state)
    for step in (2, 3):
        resumed.set_lr_factor(factors[step])
        second(batch(step)).square().mean().backward()
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted.parameters(), second.parameters()))


def test_state_of_another_setup_is_refused():
    fb = FusedBackward(groups(model()), adamw)
    small = FusedBackward([{"params": list(nn.Linear(2, 2).parameters()), "lr": 1e-3}], adamw)
    with pytest.raises(OptimizerError, match="2 per-parameter optimizers, this run trains 6 tensors"):
        fb.load_state_dict(small.state_dict())


def test_param_groups_expose_the_current_learning_rates():
    fb = FusedBackward(groups(model()), adamw)
    fb.set_lr_factor(0.5)
    assert [g["lr"] for g in fb.param_groups] == [5e-3] * 4 + [1.5e-3] * 2
