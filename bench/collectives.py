"""What a collective costs on this machine's backend: all-gather and reduce-scatter (FSDP's two,
per unit and step) against all-reduce (DDP's one), for shard sizes like a unit's.

Run under torchrun; rank 0 prints the table:

    torchrun --standalone --nproc_per_node=2 -m bench.collectives [--sizes-mb 0.25 1 4] [--repeats 20]

FSDP2 moves a unit's weights once forward (all-gather), once backward (all-gather) and its
gradients once (reduce-scatter); DDP all-reduces the gradients once. On NCCL a reduce-scatter
costs about half an all-reduce of the whole tensor; where the backend's reduce-scatter is slower,
fsdp's step costs more than ddp's whatever the sharding code does (BENCHMARKS.md (g)).
"""

import argparse
import time

import torch
import torch.distributed as dist

from minidream.training.distributed import init_distributed


def timed(run, repeats: int) -> float:
    """Milliseconds per call, after 3 warm-up calls."""
    for _ in range(3):
        run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[0.25, 1.0, 4.0], help="fp32 shard sizes per rank")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    env = init_distributed()
    world = env.world_size
    if world == 1:
        raise SystemExit("bench.collectives measures collectives between ranks: run it under torchrun --nproc_per_node=2 (or more)")
    if env.is_main:
        print(f"{dist.get_backend()} backend, {world} ranks\n")
        print("| shard per rank | all_gather | reduce_scatter | all_reduce of the whole tensor |")
        print("|---|---|---|---|")
    for size in args.sizes_mb:
        n = int(size * 2**20 / 4)
        shard, whole = torch.randn(n, device=env.device), torch.randn(world * n, device=env.device)
        gathered, scattered = torch.empty_like(whole), torch.empty_like(shard)
        all_gather = timed(lambda: dist.all_gather_single(gathered, shard), args.repeats)
        reduce_scatter = timed(lambda: dist.reduce_scatter_single(scattered, whole), args.repeats)
        all_reduce = timed(lambda: dist.all_reduce(whole), args.repeats)
        if env.is_main:
            print(f"| {size:g} MB | {all_gather:.2f} ms | {reduce_scatter:.2f} ms | {all_reduce:.2f} ms |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
