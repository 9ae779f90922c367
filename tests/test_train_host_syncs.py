"""Issue 9: between two metric reads a training step never reads a tensor's value on the host.

On a GPU every such read (`.item()`, `bool(t)`, `float(t)`) makes the CPU wait until the GPU
has finished all queued work, so the next step cannot be queued ahead. Each of them reaches
the dispatcher as `aten._local_scalar_dense`, also when torch reads a value internally (the
non-fused AdamW reads its step count that way), so counting that op during a real train.py
run on the CPU finds them without a GPU. Host-to-device copies are covered by code, not here:
on the CPU there are none to see.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from train_runs import STEPS, metrics, train_args

import train
from minidream.training.dataset import DreamBoothData
from minidream.training.metrics import PendingSteps


class HostReads(TorchDispatchMode):
    """Appends "read" to `events` whenever a tensor's value is read on the host."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.events.append("read")
        return func(*args, **(kwargs or {}))


def reads_inside_steps(run_dir, training_data, monkeypatch, overrides) -> int:
    """Host reads made from the start of a step's first micro-batch to its record, over a
    STEPS-step train.py run that reads its metrics back every 4 steps."""
    events = []
    take, add = DreamBoothData.next, PendingSteps.add

    def marked_next(self, cursor):
        events.append("begin")  # a micro-batch is about to be drawn
        return take(self, cursor)

    def marked_add(self, step, *args):
        events.append(("end", step))  # the step's values are queued for the next read
        return add(self, step, *args)

    monkeypatch.setattr(DreamBoothData, "next", marked_next)
    monkeypatch.setattr(PendingSteps, "add", marked_add)
    with HostReads(events):
        assert train.main(train_args(run_dir, training_data, ("train.batch_size=2", "run.log_every_n_steps=4", *overrides))) == 0
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))

    count, inside, ended = 0, False, []
    for event in events:
        if event == "begin":
            inside = True
        elif isinstance(event, tuple):
            inside = False
            ended.append(event[1])
        elif inside:
            count += 1
    assert ended == list(range(1, STEPS + 1))
    return count


@pytest.mark.parametrize("overrides", [
    (),
    ("train.train_text_encoder=true", "train.gradient_accumulation_steps=2"),
    ("train.mixed_precision=bf16",),
    ("train.mixed_precision=fp16",),  # the GradScaler's unscale, overflow check and update stay on the device
    ("train.ema_decay=0.9", "train.snr_gamma=5", "train.noise_offset=0.05", "train.input_perturbation=0.05", "train.loss=huber"),
], ids=["default", "text-encoder-accumulate", "bf16", "fp16", "recipe"])
def test_no_host_reads_between_the_start_of_a_step_and_its_record(overrides, tmp_path, training_data, monkeypatch, one_thread):
    assert reads_inside_steps(tmp_path / "run", training_data, monkeypatch, overrides) == 0


def test_the_count_sees_the_reads_a_non_fused_adamw_makes(tmp_path, training_data, monkeypatch, one_thread):
    """The control: the for-each AdamW reads its step count on the host, and skipping a step
    then needs the host to read the gradient norm (training.step_unless)."""
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *args, **kwargs: adamw(*args, **kwargs | {"fused": False}))
    assert reads_inside_steps(tmp_path / "run", training_data, monkeypatch, ()) >= 2 * STEPS
