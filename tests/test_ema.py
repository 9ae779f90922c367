"""The EMA of the trained weights (training/ema.py): its update against a hand-written loop and
diffusers' EMAModel, the warmup's closed form, skipped steps, no host reads, swap and resume."""

import io

import pytest
import torch
from diffusers.training_utils import EMAModel
from host_reads import HostReads
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from minidream.training.ema import EMA, ema_decay


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))


def perturb(module: nn.Module, seed: int) -> None:
    """Stand in for an optimizer step: move every weight a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def snapshot(ema: EMA) -> dict:
    state = ema.state_dict()
    return {"shadow": {k: v.clone() for k, v in state["shadow"].items()}, "updates": state["updates"].clone()}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("warmup", [False, True])
def test_update_matches_a_hand_written_loop_over_the_state_dict(warmup):
    m = model()
    ema = EMA(m.named_parameters(), decay=0.9, warmup=warmup)
    expected = {k: v.detach().clone().double() for k, v in m.named_parameters()}
    for n in range(6):
        perturb(m, n)
        d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        weights = dict(m.named_parameters())
        for name in expected:  # ema = d * ema + (1 - d) * theta, in float64
            expected[name] = d * expected[name] + (1 - d) * weights[name].detach().double()
        ema.update()
        for name, value in ema.state_dict()["shadow"].items():
            torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-7, msg=f"{name} after update {n}")
    assert ema.state_dict()["updates"].item() == 6


@given(st.integers(0, 10**7), st.floats(0.5, 0.99999))
def test_warmup_decay_closed_form(n, decay):
    assert ema_decay(torch.tensor(n), decay, warmup=True).item() == pytest.approx(min(decay, (1 + n) / (10 + n)), rel=1e-12)
    assert ema_decay(torch.tensor(n), decay, warmup=False).item() == pytest.approx(decay, rel=1e-15)


def test_warmup_matches_diffusers_ema_model_from_the_second_update():
    """diffusers' EMAModel (use_ema_warmup=False: decay min(d, (1 + s) / (10 + s)), s = step - 1) uses the
    same schedule, except that its first update copies the weights (decay 0) where ours uses 1/10."""
    ours_model, ref_model = model(), model()
    ema = EMA(ours_model.named_parameters(), decay=0.995, warmup=True)
    perturb(ours_model, 0)
    perturb(ref_model, 0)
    ema.update()
    ref = EMAModel(ref_model.parameters(), decay=0.995, foreach=True)
    ref.shadow_params = [s.clone() for s in ema.shadow]
    ref.optimization_step = 1
    for k in range(1, 8):
        perturb(ours_model, k)
        perturb(ref_model, k)
        ema.update()
        ref.step(ref_model.parameters())
        for ours, theirs in zip(ema.shadow, ref.shadow_params):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_a_skipped_update_leaves_the_ema_bit_identical():
    m = model()
    ema = EMA(m.named_parameters(), decay=0.99, warmup=True)
    perturb(m, 0)
    ema.update(torch.tensor(False))
    before = snapshot(ema)
    perturb(m, 1)
    ema.update(torch.tensor(True))
    after = ema.state_dict()
    assert all(bits_equal(after["shadow"][k], v) for k, v in before["shadow"].items())
    assert after["updates"].item() == before["updates"].item() == 1
    # The next real update uses the decay of update n = 1, as if the skipped step never happened.
    reference = EMA(m.named_parameters(), decay=0.99, warmup=True)
    reference.load_state_dict(before)
    ema.update(torch.tensor(False))
    reference.update()
    assert all(bits_equal(a, b) for a, b in zip(ema.shadow, reference.shadow))


def test_update_never_reads_a_value_on_the_host():
    m = model()
    ema = EMA(m.named_parameters(), decay=0.9999, warmup=True)
    skip = torch.tensor(False)
    with HostReads() as reads:
        for _ in range(3):
            ema.update(skip)
            ema.update()
    assert reads.count == 0
    # The control: the same for-each lerp with the 0-d weight passed as a Scalar does read it.
    with HostReads() as reads:
        torch._foreach_lerp_(ema.shadow, list(m.parameters()), torch.tensor(0.5))
    assert reads.count == 1


def test_state_dict_round_trip_continues_bit_identically():
    m = model()
    ema = EMA(m.named_parameters(), decay=0.99, warmup=True)
    for k in range(3):
        perturb(m, k)
        ema.update()
    resumed = EMA(m.named_parameters(), decay=0.99, warmup=True)  # starts as a copy of the current weights
    buffer = io.BytesIO()
    torch.save(ema.state_dict(), buffer)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    perturb(m, 3)
    ema.update()
    resumed.update()
    assert all(bits_equal(a, b) for a, b in zip(ema.shadow, resumed.shadow))
    assert resumed.updates.item() == ema.updates.item() == 4


def test_load_state_dict_names_what_does_not_match():
    ema = EMA(model().named_parameters(), decay=0.99, warmup=False)
    state = ema.state_dict()
    other = EMA(nn.Linear(6, 5).named_parameters(), decay=0.99, warmup=False)
    with pytest.raises(ValueError, match=r"missing \['bias', 'weight'\].*train_text_encoder"):
        other.load_state_dict(state)


def test_swapped_in_puts_the_average_in_the_model_and_restores_the_weights_exactly():
    m = model()
    ema = EMA(m.named_parameters(), decay=0.5, warmup=False)
    perturb(m, 0)
    ema.update()
    weights = {k: v.detach().clone() for k, v in m.named_parameters()}
    pointers = [p.data_ptr() for p in m.parameters()]
    averaged = {k: v.clone() for k, v in ema.state_dict()["shadow"].items()}
    x = torch.randn(2, 6)
    with ema.swapped_in():
        assert all(torch.equal(v, averaged[k]) for k, v in m.state_dict().items())
        inside = m(x)
    assert all(bits_equal(v, weights[k]) for k, v in m.state_dict().items())
    assert [p.data_ptr() for p in m.parameters()] == pointers
    assert not torch.equal(inside, m(x))


def test_adapters_only_leave_the_frozen_base_alone():
    """LoRA-style: the EMA covers only the trainable tensors; frozen ones are neither copied nor swapped."""
    base = nn.Linear(6, 6).requires_grad_(False)
    down, up = nn.Linear(6, 2, bias=False), nn.Linear(2, 6, bias=False)
    nn.init.zeros_(up.weight)
    adapters = nn.ModuleDict({"down": down, "up": up})
    ema = EMA(((n, p) for n, p in adapters.named_parameters() if p.requires_grad), decay=0.9, warmup=False)
    assert ema.names == ["down.weight", "up.weight"]
    base_before = base.weight.clone()
    perturb(adapters, 0)
    ema.update()
    trained_up = up.weight.detach().clone()
    with ema.swapped_in():
        torch.testing.assert_close(up.weight, 0.1 * trained_up, rtol=1e-6, atol=0)  # 0.9 * 0 (zero init) + 0.1 * theta
    assert torch.equal(up.weight, trained_up) and torch.equal(base.weight, base_before)


def test_decay_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="train.ema_decay must be in"):
        EMA(model().named_parameters(), decay=1.0, warmup=False)
