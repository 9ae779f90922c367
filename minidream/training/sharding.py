"""train.sharding=fsdp: the trained modules sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Each rank keeps 1/N of every trained weight, its gradient and its AdamW moments (DTensors of
one Shard(0) placement). One FSDP unit per UNet block (input, middle, output) and per
text-encoder layer, then the module itself for what is left (embeddings, norms, conv_in/out):
a unit's weights are all-gathered just before its forward and freed after it, so a rank holds
one block's full weights at a time, not the model's.

What stays replicated: the frozen VAE and text encoder (in the AMP dtype, as under DDP), and
LoRA adapters — a LoRA run under fsdp is wrapped in DDP instead (see `uses_fsdp`).
"""

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from minidream.config import TrainConfig
from minidream.models.unet import UNet
from minidream.training.ema import EMA


def uses_fsdp(cfg: TrainConfig) -> bool:
    """Whether this run's trained weights are FSDP-sharded (and checkpointed with DCP).

    LoRA adapters are replicated even under train.sharding=fsdp: they are ~1% of the UNet
    (megabytes), so sharding saves almost nothing, while FSDP would add an all-gather and a
    reduce-scatter per block of tensors too small to fill the link; DDP all-reduces them in
    one bucket (bench/fsdp_step.py measures both).
    """
    return cfg.train.sharding == "fsdp" and not cfg.lora.rank


def units(module: nn.Module) -> list[nn.Module]:
    """The FSDP units of a trained module: the UNet's blocks, or a text encoder's layers (the
    entries of its ModuleLists, outermost ones only)."""
    if isinstance(module, UNet):
        return [*module.input_blocks, module.middle_block, *module.output_blocks]
    found, inside = [], set()
    for child in module.modules():
        if id(child) in inside:
            continue
        if isinstance(child, nn.ModuleList):
            found += list(child)
            inside |= {id(m) for entry in child for m in entry.modules()}
    return found


def shard(trained: dict[str, nn.Module], groups: list[dict], amp_dtype: torch.dtype, device: torch.device,
          world_size: int) -> list[dict]:
    """fully_shard every trained module in place (its units, then itself) on all `world_size`
    ranks; return the optimizer's parameter groups over the new (sharded) parameters.

    Mixed precision: weights are gathered in the AMP dtype and gradients reduced in fp32 (the
    fp32 shards are the master weights); fp32 runs get no policy.
    """
    names = {id(p): f"{name}.{key}" for name, module in trained.items() for key, p in module.named_parameters()}
    group_names = [[names[id(p)] for p in group["params"]] for group in groups]
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy() if amp_dtype == torch.float32 else MixedPrecisionPolicy(
        param_dtype=amp_dtype, reduce_dtype=torch.float32
    )
    for module in trained.values():
        for unit in units(module):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
    sharded = {f"{name}.{key}": p for name, module in trained.items() for key, p in module.named_parameters()}
    return [{**group, "params": [sharded[n] for n in ns]} for group, ns in zip(groups, group_names)]


@contextlib.contextmanager
def gradient_sync(modules: Iterable[nn.Module], enabled: bool) -> Iterator[None]:
    """Inside the block, backward reduces gradients across ranks only if `enabled` (the last
    micro-step of an accumulation): DDP's no_sync(), FSDP2's set_requires_gradient_sync (its
    unsharded gradients then accumulate locally until the syncing micro-step)."""
    with contextlib.ExitStack() as stack:
        for module in modules:
            if isinstance(module, FSDPModule):
                module.set_requires_gradient_sync(enabled)
            elif not enabled:
                stack.enter_context(module.no_sync())
        yield


@contextlib.contextmanager
@torch.no_grad()
def local_shards(optimizer: torch.optim.Optimizer, sharded: bool) -> Iterator[list[torch.Tensor]]:
    """Inside the block, the optimizer steps this rank's local shards as plain tensors; it yields
    its parameters, each holding its gradient (the parameters themselves where not `sharded`).

    Why: a DTensor op pays sharding propagation on the host for every tensor of its list
    (pytorch#134191; BENCHMARKS.md measures it with bench.sharded_optimizer).
    AdamW is elementwise, so stepping the shards is the same arithmetic. The optimizer keeps its DTensor parameters and state outside
    the block (what DCP saves and reshards): the state it steps are views of that state's local
    tensors, and the state it creates on a first step is wrapped back as DTensors on the way out.
    """
    if not sharded:
        yield [p for group in optimizer.param_groups for p in group["params"]]
        return
    held = [group["params"] for group in optimizer.param_groups]
    state = optimizer.state
    views = [[p.to_local() for p in params] for params in held]  # under no_grad: the shards themselves
    pairs = [(p, shard) for params, shards in zip(held, views) for p, shard in zip(params, shards)]
    for p, shard in pairs:
        shard.grad = local(p.grad) if p.grad is not None else None
        if p in state:
            state[shard] = {key: local(value) for key, value in state[p].items()}
    for group, shards in zip(optimizer.param_groups, views):
        group["params"] = shards
    try:
        yield [shard for _, shard in pairs]
    finally:
        for group, params in zip(optimizer.param_groups, held):
            group["params"] = params
        for p, shard in pairs:
            shard.grad = None
            stepped = state.pop(shard, None)
            if stepped is not None and p not in state:  # created by this step: the moments are shards of p's layout
                state[p] = {key: like(value, p) if key != "step" else value for key, value in stepped.items()}


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, sharded: bool) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over `params`' gradients; where they are `sharded` (each
    rank holding other parts), the norm is the global one: this rank's sum of squares, summed
    over ranks in one all-reduce, so every rank clips by the same factor."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if sharded:
        norm = norm.square()
        dist.all_reduce(norm)
        norm = norm.sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local part (of a replicated one: its value); a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def like(local_tensor: torch.Tensor, reference: DTensor) -> DTensor:
    """`local_tensor` (this rank's shard, same layout as `reference`'s) as a DTensor, sharing its storage."""
    return DTensor.from_local(
        local_tensor, reference.device_mesh, reference.placements, run_check=False, shape=reference.shape,
        stride=reference.stride(),
    )


class ShardedEMA(EMA):
    """The EMA of FSDP-sharded weights: a shadow of this rank's local shards only (1/N of the
    weights, like the optimizer moments), updated by the same on-device kernels.

    The parameters it averages are views of the shards' storage, which FSDP owns (it all-gathers
    from it), so the swap for validation and export copies through a temporary instead of
    exchanging storages.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, DTensor]], decay: float, warmup: bool):
        named = list(named_parameters)
        self.references = [p for _, p in named]  # the DTensor layout of each shard
        super().__init__([(name, p.detach().to_local()) for name, p in named], decay, warmup)

    def sharded_shadow(self) -> dict[str, DTensor]:
        """The shadow as DTensors laid out like the weights (for DCP and for gathering)."""
        return {name: like(s, ref) for name, s, ref in zip(self.names, self.shadow, self.references)}

    @torch.no_grad()
    def _swap(self) -> None:
        for p, s in zip(self.params, self.shadow):
            held = p.clone()
            p.copy_(s)
            s.copy_(held)


def gathered(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """The full tensors of `tensors` (DTensors are all-gathered one at a time; every rank must
    call), moved to the host where `keep` (the main rank), dropped elsewhere: the keeping rank
    never holds more than the one full copy it returns, and the others only one tensor."""
    out = {}
    for key, value in tensors.items():
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if keep:
            out[key] = full.detach().cpu()
    return out


def plain_twin(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded module of `module`'s class and config holding `state` (no copy: the tensors are assigned)."""
    cls = next(c for c in type(module).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))
    with torch.device("meta"):
        twin = cls(module.config)
    twin.load_state_dict(state, assign=True)
    return twin
