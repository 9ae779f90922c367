"""Issue 19: under train.sharding=fsdp the optimizer steps the local shards as plain tensors
(sharding.local_shards) and the gradient norm is summed over ranks in one all-reduce
(sharding.clip_grad_norm), instead of every foreach op dispatching over hundreds of DTensors.

Checked on 2 gloo ranks against the DTensor path it replaces, torch's own clip_grad_norm_ and
AdamW on the DTensor parameters: the same weights and moments bit for bit, the same global
norm, the state left as DTensors of the weights' layout (what DCP saves and reshards), a
non-finite gradient on one rank skipping the step on both."""

import multiprocessing
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

from minidream.training import sharding
from minidream.training.step import step_unless

WORLD = 2
MAX_NORM = 0.05  # below the gradients' norm: the clip acts


class Layers(nn.Module):
    """Two FSDP units (the ModuleList's entries) and a root part; 7 rows do not split evenly over 2 ranks."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(5, 7), nn.Linear(7, 5)])
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.out(x)


def backward(model, rank, poison):
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(10 + rank))
    model(x).square().mean().backward()
    if poison:  # after the reduce-scatter: only this rank's shard is non-finite
        sharding.local(next(model.parameters()).grad).view(-1)[0] = float("inf")


def local_states(optimizer, model):
    return [{k: sharding.local(v).clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]


def worker(rank, init_file, failures):
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        models, optimizers = [], []
        for _ in range(2):  # [0]: the DTensor path (torch alone), [1]: the local-shard path
            torch.manual_seed(0)
            model = Layers()
            groups = sharding.shard({"m": model}, [{"params": list(model.parameters()), "lr": 1e-2}], torch.float32,
                                    torch.device("cpu"), WORLD)
            models.append(model)
            optimizers.append(torch.optim.AdamW(groups, fused=True, weight_decay=1e-2))
        reference, local_path = models
        for step in range(3):  # the first step creates the state; the later ones step existing state
            poison = step == 2 and rank == 1  # an inf on one rank only
            before = [p.to_local().clone() for p in local_path.parameters()]
            for model in models:
                backward(model, rank, poison)
            norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), MAX_NORM).full_tensor()
            step_unless(optimizers[0], ~torch.isfinite(norm))
            with sharding.local_shards(optimizers[1], sharded=True) as shards:
                assert all(not isinstance(s, DTensor) and s.grad is not None for s in shards)
                mine = sharding.clip_grad_norm(shards, MAX_NORM, sharded=True)
                step_unless(optimizers[1], ~torch.isfinite(mine))
            if step == 2:  # the all-reduced norm is non-finite on both ranks: both skip
                assert not torch.isfinite(mine) and not torch.isfinite(norm), (mine, norm)
                assert all(torch.equal(a, p.to_local()) for a, p in zip(before, local_path.parameters()))
            else:
                assert norm > MAX_NORM and torch.allclose(mine, norm, rtol=1e-6, atol=0), (step, mine, norm)
            for model, optimizer in zip(models, optimizers):
                optimizer.zero_grad(set_to_none=True)
            for p, q in zip(reference.parameters(), local_path.parameters()):
                assert torch.equal(p.to_local(), q.to_local()), (step, rank)
            assert all(p.grad is None for p in local_path.parameters())
            for a, b in zip(local_states(optimizers[0], reference), local_states(optimizers[1], local_path)):
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (step, rank)
        for p in local_path.parameters():  # the state outside the block: DTensors laid out as the weights
            state = optimizers[1].state[p]
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
            for key in ("exp_avg", "exp_avg_sq"):
                assert isinstance(state[key], DTensor) and state[key].placements == p.placements
                assert state[key].shape == p.shape
        _, saved = get_state_dict(local_path, optimizers[1])  # what DCP is given
        _, expected = get_state_dict(reference, optimizers[0])
        for name, values in expected["state"].items():
            for key, value in values.items():
                assert torch.equal(sharding.local(saved["state"][name][key]), sharding.local(value)), (name, key)
        dist.destroy_process_group()
    except BaseException:
        failures.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def test_stepping_the_local_shards_equals_stepping_the_dtensors(tmp_path):
    context = multiprocessing.get_context("spawn")
    failures = context.Queue()
    workers = [context.Process(target=worker, args=(rank, tmp_path / "rendezvous", failures)) for rank in range(WORLD)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=240)
    messages = [failures.get() for _ in range(failures.qsize())] if not failures.empty() else []
    assert not messages, "\n".join(messages)
    assert [p.exitcode for p in workers] == [0] * WORLD


def test_unsharded_runs_step_the_parameters_themselves():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    with sharding.local_shards(optimizer, sharded=False) as stepped:
        assert stepped == list(model.parameters())
        norm = sharding.clip_grad_norm(stepped, 1e-3, sharded=False)
    assert torch.allclose(norm, torch.tensor(8.0).sqrt())  # d(sum)/dW = ones(2, 3), d(sum)/db = ones(2)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(clipped, torch.tensor(1e-3), rtol=1e-5)
