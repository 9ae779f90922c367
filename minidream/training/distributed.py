"""torchrun's environment, the process group, and the few collectives training needs.

Run alone, everything here degrades to single-process no-ops, so train.py has one code path.
"""

import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from minidream.config import DEVICES


@dataclass(frozen=True)
class Distributed:
    """Where this process sits: its rank among world_size, and the device it owns."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def log(env: Distributed, message: str) -> None:
    """A line for the user, from the main rank only (above any progress bar)."""
    if env.is_main:
        tqdm.write(message)


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> Distributed:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group.

    `device`: "auto" takes this rank's GPU when CUDA is present, else the CPU; "cpu" forces
    the CPU. The backend follows the device: NCCL for GPUs, gloo for CPUs. A collective that
    waits longer than `timeout_s` for another rank raises (train.collective_timeout_s).
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device == "cuda" and not use_cuda:
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA GPU")
    own_device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(own_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", device_id=own_device if use_cuda else None, timeout=timedelta(seconds=timeout_s),
            store=attempt_store("process-group", rank == 0), rank=rank, world_size=world_size,
        )
    return Distributed(rank, world_size, local_rank, own_device)


def attempt_store(name: str, host: bool = False) -> dist.Store:
    """The rendezvous store at MASTER_ADDR:MASTER_PORT under a prefix of its own for this launch attempt.

    torchrun's agent hosts the store and keeps it across restarts, so a restarted worker group
    (--max-restarts) would read the previous attempt's keys — gloo then dials the dead workers'
    addresses and fails — unless every attempt uses fresh keys: TORCHELASTIC_RESTART_COUNT is in
    the prefix. Without torchrun's agent, rank 0 (`host`) serves the store, as env:// does.
    """
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=host and not agent_hosts, timeout=timedelta(seconds=300))
    return dist.PrefixStore(f"minidream/{name}/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def timed_out(error: BaseException) -> bool:
    """Whether `error` is a collective giving up on a rank (gloo's "Timed out waiting", NCCL's DistBackendError)."""
    return isinstance(error, dist.DistBackendError) or "Timed out waiting" in str(error)


class Heartbeat:
    """Each rank's "still here", written to torchrun's rendezvous store every few seconds by a
    background thread, so that when a collective times out the ranks still running can name the
    one that stopped answering (killed, frozen, its machine gone) instead of only saying that
    something timed out. A rank that is alive but stuck elsewhere keeps beating; then no rank
    is named, and the message says so."""

    def __init__(self, env: Distributed, timeout_s: float):
        self.env = env
        self.interval = max(0.5, min(10.0, timeout_s / 10))
        self.stopped = threading.Event()
        self.store = attempt_store("heartbeat")
        self.thread = threading.Thread(target=self._beat, name="minidream-heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stopped.is_set():
            self.store.set(f"rank-{self.env.rank}", repr(time.time()))
            self.stopped.wait(self.interval)

    def silent_ranks(self) -> dict[int, float]:
        """Ranks whose last beat is older than three intervals: rank -> seconds since it (inf: never beat)."""
        store, now, silent = attempt_store("heartbeat"), time.time(), {}  # a client of its own: the thread uses the other
        for rank in range(self.env.world_size):
            key = f"rank-{rank}"
            age = now - float(store.get(key)) if store.check([key]) else float("inf")
            if age > 3 * self.interval:
                silent[rank] = age
        return silent

    def explain(self, timeout_s: float) -> str:
        """The one line for a timed-out collective."""
        silent = self.silent_ranks()
        if not silent:
            return (f"a collective waited more than train.collective_timeout_s={timeout_s:g} s, but every rank is still "
                    "alive: one is stuck elsewhere (see its log)")
        named = ", ".join(f"rank {rank} (last heard {age:.0f} s ago)" for rank, age in sorted(silent.items()))
        return f"a collective waited more than train.collective_timeout_s={timeout_s:g} s: {named} stopped answering"

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The average of a tensor over all ranks (the tensor itself when alone)."""
    if not dist.is_initialized():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any: all ranks agree on stopping at the same step."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable, small), in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
