"""What the bench scripts share: the command-line options, alternating timing, the machine
description, and the markdown table they print."""

import argparse
import os
import platform
import shlex
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import torch

from minidream.config import ARCHITECTURES, ModelConfig
from minidream.models.precision import DTYPES

H100_SXM_BF16_DENSE_TFLOPS = 989.0
# DESIGN.md's model FLOPs per image for SD 1.5 at 512x512 (64x64 latents), in TFLOP.
SD15_TFLOP = {"unet_forward": 0.80, "unet_train": 2.41, "vae_encode": 1.1, "vae_decode": 2.5}


@dataclass(frozen=True)
class Settings:
    """The options every bench script takes."""

    device: torch.device
    dtype_name: str
    config_name: str
    compile: bool
    channels_last: bool
    warmup: int
    repeats: int
    peak_tflops: float | None  # the device's, for MFU; None: unknown
    seed: int
    compile_backend: str = "inductor"  # torch.compile's; the CPU rehearsal takes "aot_eager" (no code generation)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def model_config(self) -> ModelConfig:
        return ARCHITECTURES[self.config_name]

    def describe(self) -> str:
        """The setup column of the table: device, precision, config and switches."""
        switches = [name for name, on in (("compile", self.compile), ("channels_last", self.channels_last)) if on]
        return " ".join([self.device.type, self.dtype_name, self.config_name, *switches])


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser holding the shared options; each script adds its own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--config", choices=ARCHITECTURES, default="sd15", help="model shapes (default sd15)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile's backend (default: %(default)s)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs for both")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each (the median is reported)")
    parser.add_argument(
        "--peak-tflops", type=float, default=None,
        help="the device's peak TFLOP/s, for MFU (default: by the GPU's name, see peak_bf16_tflops)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Settings(
        device=device,
        dtype_name=args.dtype or ("bf16" if device.type == "cuda" else "fp32"),
        config_name=args.config,
        compile=args.compile,
        channels_last=args.channels_last,
        warmup=args.warmup,
        repeats=args.repeats,
        peak_tflops=args.peak_tflops or device_peak_tflops(device),
        seed=args.seed,
        compile_backend=args.compile_backend,
    )


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a clock read covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(runs: dict[str, Callable[[], object]], settings: Settings) -> dict[str, float]:
    """Median seconds per call of each run. After warm-up calls of each, the runs take turns,
    the order reversed every round (A B, B A, A B, ...), so drifts in machine load and clock
    speed fall on both alike."""
    for _ in range(settings.warmup):
        for run in runs.values():
            run()
    seconds = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(settings.repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            synchronize(settings.device)
            start = time.perf_counter()
            runs[name]()
            synchronize(settings.device)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


@dataclass(frozen=True)
class Row:
    """One timed comparison: a table row."""

    benchmark: str
    shape: str
    items: int  # what one call produces, for the rate: samples, denoising steps or images
    unit: str  # the rate's unit, e.g. "samples/s"
    tflop_per_call: float | None  # model FLOPs of one call where known (see bench.models.unet_tflop), else None
    minidream_s: float
    diffusers_s: float

    @property
    def ratio(self) -> float:
        """minidream's time over diffusers': < 1 means minidream is faster."""
        return self.minidream_s / self.diffusers_s


def compared(
    benchmark: str, shape: str, items: int, unit: str, tflop: float | None, seconds: dict[str, float]
) -> Row:
    """The row of one `time_alternating` result; `tflop`: the call's model FLOPs where known."""
    return Row(
        benchmark=benchmark,
        shape=shape,
        items=items,
        unit=unit,
        tflop_per_call=tflop,
        minidream_s=seconds["minidream"],
        diffusers_s=seconds["diffusers"],
    )


def latent_scale(height: int, width: int) -> float:
    """FLOPs at this latent size relative to 512x512 images (64x64 latents)."""
    return height * width / (64 * 64)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as cpuinfo:
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    cores = len(os.sched_getaffinity(0))
    return f"{names[0] if names else platform.processor()}, {cores} cores, {torch.get_num_threads()} torch threads"


def version_numbers() -> dict[str, str | None]:
    """torch, the CUDA it was built for (None: a CPU build), diffusers and Python."""
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__, "python": platform.python_version(),
    }


def versions() -> str:
    numbers = version_numbers()
    cuda = f" (CUDA {numbers['cuda']})" if numbers["cuda"] else ""
    return f"torch {numbers['torch']}{cuda}, diffusers {numbers['diffusers']}, Python {numbers['python']}"


def command(module: str, argv: list[str]) -> str:
    return shlex.join(["python", "-m", module, *argv])


def peak_bf16_tflops(gpu_name: str) -> float | None:
    """Dense bf16 TFLOP/s by the vendor's datasheet for the GPUs named here, else None (unknown).
    The H200 (SXM) has the H100 SXM's Hopper rate; the PCIe and NVL parts run lower clocks."""
    if ("H100" in gpu_name or "H200" in gpu_name) and not any(part in gpu_name for part in ("PCIe", "NVL")):
        return H100_SXM_BF16_DENSE_TFLOPS
    if "A100" in gpu_name:
        return 312.0
    return None


def device_peak_tflops(device: torch.device) -> float | None:
    return peak_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def mfu_percent(row: Row, seconds: float, settings: Settings) -> float | None:
    """Model FLOPs utilisation in % of the peak, where it means something: on a GPU of known
    peak, with FLOPs known."""
    if settings.device.type != "cuda" or row.tflop_per_call is None or settings.peak_tflops is None:
        return None
    return 100 * row.tflop_per_call / seconds / settings.peak_tflops


def mfu(row: Row, seconds: float, settings: Settings) -> str:
    percent = mfu_percent(row, seconds, settings)
    if percent is None:
        unknown_peak = settings.device.type == "cuda" and row.tflop_per_call is not None
        return "peak unknown" if unknown_peak else "-"
    return f"{percent:.1f}%"


TABLE_HEADER = (
    "| benchmark | setup | shape | minidream ms | diffusers ms | minidream/diffusers "
    "| minidream rate | diffusers rate | MFU minidream | MFU diffusers |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def table_row(row: Row, settings: Settings) -> str:
    cells = [
        row.benchmark,
        settings.describe(),
        row.shape,
        f"{1000 * row.minidream_s:.1f}",
        f"{1000 * row.diffusers_s:.1f}",
        f"**{row.ratio:.3f}**",
        f"{row.items / row.minidream_s:.2f} {row.unit}",
        f"{row.items / row.diffusers_s:.2f} {row.unit}",
        mfu(row, row.minidream_s, settings),
        mfu(row, row.diffusers_s, settings),
    ]
    return "| " + " | ".join(cells) + " |"


def report(rows: list[Row], settings: Settings, command_line: str) -> None:
    """Print the rows as a markdown table, with the machine, the versions and the command."""
    print(f"\nMachine: {machine(settings.device)}; {versions()}")
    runs = f"medians of {settings.repeats} alternating runs after {settings.warmup} warm-up"
    print(f"Command: `{command_line}` ({runs})\n")
    print(TABLE_HEADER)
    for row in rows:
        print(table_row(row, settings))
