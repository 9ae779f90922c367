"""The host cost of stepping FSDP-sharded weights: gradient clipping and fused AdamW over the
DTensor parameters (torch alone) against the same on their local shards (sharding.local_shards
and sharding.clip_grad_norm, what train.py runs), at SD 1.5 shapes.

Rank 0 of N on the fake process group, as bench.fsdp_memory: the shards and the arithmetic are
real, the collectives exchange nothing. Both ways compute the same numbers bit for bit
(tests/test_sharded_step.py), so the difference in time is what DTensor's dispatch adds on the
host per step — sharding propagation for every tensor of every foreach op (pytorch#134191). On a
GPU the kernels are queued and this host time is the step's floor; on this CPU it adds to the
arithmetic. The two ways alternate, and the median of each is taken.

    python -m bench.sharded_optimizer --ranks 4 [--config sd15] [--repeats 5]
"""

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from bench.common import command, machine, versions
from bench.fsdp_memory import sharded_after_one_step
from minidream.config import ARCHITECTURES
from minidream.training.sharding import clip_grad_norm, local_shards

MAX_NORM = 1.0


def on_dtensors(optimizer: torch.optim.Optimizer, weights: list) -> None:
    torch.nn.utils.clip_grad_norm_(weights, MAX_NORM)
    optimizer.step()


def on_local_shards(optimizer: torch.optim.Optimizer, weights: list) -> None:
    with local_shards(optimizer, sharded=True) as shards:
        clip_grad_norm(shards, MAX_NORM, sharded=True)
        optimizer.step()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4, help="N: the world size rank 0 plays in (default %(default)s)")
    parser.add_argument("--config", choices=ARCHITECTURES, default="sd15")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each way")
    args = parser.parse_args(argv)
    trained, weights, optimizer = sharded_after_one_step(args.ranks, args.config, latent=8)
    ways = {"DTensor parameters (torch alone)": on_dtensors, "local shards (train.py)": on_local_shards}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):  # the gradients stay: every call steps them again
        for name, way in ways.items():
            start = time.perf_counter()
            way(optimizer, weights)
            seconds[name].append(time.perf_counter() - start)
    dist.destroy_process_group()
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    elements = sum(p.to_local().numel() for p in weights)
    print(f"Command: `{command('bench.sharded_optimizer', argv if argv is not None else sys.argv[1:])}`  \n"
          f"Machine: {machine(torch.device('cpu'))}  \n{versions()}\n")
    print(f"{args.config}: UNet + text encoder trained, {len(weights)} weight tensors; rank 0 of {args.ranks} steps "
          f"{elements / 1e6:.0f}M elements\n")
    print("| clip + fused AdamW step over | ms per step (median) |")
    print("|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {value * 1000:.1f} |")
    saved = medians["DTensor parameters (torch alone)"] - medians["local shards (train.py)"]
    print(f"\nDTensor dispatch: {saved * 1000:.1f} ms per step, {saved / len(weights) * 1e6:.0f} us per weight tensor")
    return {"tensors": len(weights), "elements": elements, "dtensor_s": medians["DTensor parameters (torch alone)"],
            "local_s": medians["local shards (train.py)"]}


if __name__ == "__main__":
    main()
