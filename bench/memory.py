"""Peak memory of the UNet training step and of one guided sampling step, minidream against
diffusers, each measured in a process of its own so that neither sees the other's tensors.

CUDA: `torch.cuda.max_memory_allocated`. CPU: the process's peak resident set (VmHWM) less its
resident set after the imports, i.e. the weights, gradients, optimizer state and activations.
"""

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import Settings, command, machine, parser, settings_from, versions
from bench.models import IMPLEMENTATIONS, unet_pair
from bench.unet_train_step import (
    add_training_options,
    make_optimizer,
    sampling_step_runs,
    step_benchmark,
    training_models,
    training_runs,
)

REPO_ROOT = Path(__file__).resolve().parents[1]  # where `python -m bench.memory` finds the package
STEPS = 3  # AdamW allocates its state in step 1; later steps hold it alongside gradients and activations


def proc_status_mb(field: str) -> float:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), in MB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def workload(impl: str, args: argparse.Namespace, settings: Settings):
    """The call to measure, with only `impl`'s model referenced (the pair shares its weights)."""
    if args.workload == "train":
        unet, twin = training_models(settings, args.gradient_checkpointing)
        params = list(unet.parameters())
        optimizer = make_optimizer(params, args.optimizer)
        return training_runs(settings, unet, twin, params, optimizer, args.batch, args.latent)[impl]
    return sampling_step_runs(settings, *unet_pair(settings, settings.dtype), args.batch, args.latent)[impl]


def cuda_peak_mb(run: Callable[[], object], calls: int, device: torch.device) -> float:
    """`torch.cuda.max_memory_allocated` over `calls` calls, in MB: what is allocated when they
    start (weights, optimizer state) plus the most they add at any moment."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(calls):
        run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def measure(impl: str, args: argparse.Namespace, settings: Settings) -> float:
    """Peak MB of `STEPS` calls of the workload, in this process."""
    baseline = 0.0 if settings.device.type == "cuda" else proc_status_mb("VmRSS")
    run = workload(impl, args, settings)
    if settings.device.type == "cuda":
        return cuda_peak_mb(run, STEPS, settings.device)
    for _ in range(STEPS):
        run()
    return proc_status_mb("VmHWM") - baseline


def child_figures(module: str, impl: str, argv: list[str]) -> dict:
    """Run `python -m module *argv --child impl` and return the JSON object its last line prints."""
    result = subprocess.run(
        [sys.executable, "-m", module, *argv, "--child", impl], check=False, cwd=REPO_ROOT, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"measuring {impl} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def measure_in_subprocess(impl: str, argv: list[str]) -> float:
    return child_figures(__spec__.name, impl, argv)["peak_mb"]


@dataclass(frozen=True)
class MemoryRow:
    """One memory comparison: a table row, in MB."""

    workload: str
    shape: str
    minidream_mb: float
    diffusers_mb: float

    @property
    def ratio(self) -> float:
        return self.minidream_mb / self.diffusers_mb


MEMORY_HEADER = "| workload | setup | shape | minidream MB | diffusers MB | minidream/diffusers |\n|---|---|---|---:|---:|---:|"


def memory_table_row(row: MemoryRow, settings: Settings) -> str:
    cells = [
        row.workload, settings.describe(), row.shape,
        f"{row.minidream_mb:.0f}", f"{row.diffusers_mb:.0f}", f"**{row.ratio:.3f}**",
    ]
    return "| " + " | ".join(cells) + " |"


def report(row: MemoryRow, settings: Settings, command_line: str) -> None:
    on_cuda = settings.device.type == "cuda"
    measure_name = "CUDA max_memory_allocated" if on_cuda else "peak RSS above the post-import RSS"
    print(f"\nMachine: {machine(settings.device)}; {versions()}")
    print(f"Command: `{command_line}` ({measure_name}, {STEPS} steps, one process per implementation)\n")
    print(MEMORY_HEADER)
    print(memory_table_row(row, settings))


def main(argv: list[str] | None = None) -> MemoryRow | None:
    argv = sys.argv[1:] if argv is None else argv
    options = parser(__doc__.splitlines()[0])
    options.add_argument("--batch", type=int, default=1, help="training batch, or images per sampling step")
    add_training_options(options)
    options.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = options.parse_args(argv)
    settings = settings_from(args)
    if args.child:
        print(json.dumps({"peak_mb": measure(args.child, args, settings)}))
        return None

    peaks = {impl: measure_in_subprocess(impl, argv) for impl in IMPLEMENTATIONS}
    name = step_benchmark(args)
    shape = f"batch {args.batch}, latent {args.latent}x{args.latent}"
    row = MemoryRow(name, shape, peaks["minidream"], peaks["diffusers"])
    report(row, settings, command(__spec__.name, argv))
    return row


if __name__ == "__main__":
    main()
