"""Memory of a LoRA training step, minidream against diffusers + PEFT: the peak (each in a process of
its own), the bytes autograd saves for backward, and the arithmetic that predicts the peak.

Peak on CUDA: `torch.cuda.max_memory_allocated` over the steps. On the CPU: the peak resident set
over the steps (VmHWM, reset once the models are built: building SD 1.5 in fp32 before casting the
base to bf16 would otherwise set it) less the resident set after the imports.
"""

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.common import Settings
from bench.lora_models import LoRAPair, adapter_parameter_count
from bench.memory import cuda_peak_mb, proc_status_mb

STEPS = 3  # AdamW allocates its state in step 1; later steps hold it alongside gradients and activations
ADAPTER_BYTES = 4 + 4 + 8  # per fp32 adapter parameter: the weight, its gradient, AdamW's two moments
MB = 2**20


def forget_build_peak() -> None:
    """Return freed memory to the OS and reset VmHWM (Linux: `5` in /proc/self/clear_refs), so the
    peak read later covers what follows only."""
    gc.collect()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure_peak(build: Callable[[], Callable[[], object]], settings: Settings, steps: int = STEPS) -> dict[str, float]:
    """MB at the peak of `steps` calls of the step `build()` returns, and MB resident before them
    (weights and adapters), both above what this process held before the build."""
    if settings.device.type == "cuda":
        baseline = torch.cuda.memory_allocated(settings.device)
        step = build()
        resident = (torch.cuda.memory_allocated(settings.device) - baseline) / MB
        return {"peak_mb": cuda_peak_mb(step, steps, settings.device) - baseline / MB, "resident_mb": resident}
    baseline = proc_status_mb("VmRSS")
    step = build()
    forget_build_peak()
    resident = proc_status_mb("VmRSS") - baseline
    for _ in range(steps):
        step()
    return {"peak_mb": proc_status_mb("VmHWM") - baseline, "resident_mb": resident}


@dataclass(frozen=True)
class Arithmetic:
    """What a LoRA step must hold at its peak, in MB: the frozen base, the fp32 adapters with their
    gradients and AdamW moments, and what autograd saves for backward (activations, and autocast's
    half copies of the fp32 adapters)."""

    base_mb: float
    adapters_mb: float
    saved_mb: float

    @property
    def total_mb(self) -> float:
        return self.base_mb + self.adapters_mb + self.saved_mb


def arithmetic(pair: LoRAPair, impl: str, saved: dict[str, int]) -> Arithmetic:
    adapters = {id(p) for p in pair.adapters[impl]}
    base = sum(p.numel() * p.element_size() for p in pair.parameters(impl) if id(p) not in adapters)
    return Arithmetic(
        base_mb=base / MB,
        adapters_mb=adapter_parameter_count(pair, impl) * ADAPTER_BYTES / MB,
        saved_mb=(saved["activations"] + saved["weight copies"]) / MB,
    )


MEMORY_HEADER = (
    "| implementation | base weights MB | adapters + grads + AdamW MB | saved for backward MB (activations + adapter copies) "
    "| predicted peak MB | measured resident before the steps MB | measured peak MB | measured / predicted |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def memory_rows(figures: dict[str, Arithmetic], saved: dict[str, dict[str, int]], peaks: dict[str, dict[str, float]]) -> list[str]:
    rows = []
    for impl, math in figures.items():
        measured = peaks.get(impl, {})
        peak = measured.get("peak_mb")
        cells = [
            impl, f"{math.base_mb:.0f}", f"{math.adapters_mb:.1f}",
            f"{math.saved_mb:.0f} ({saved[impl]['activations'] / MB:.0f} + {saved[impl]['weight copies'] / MB:.1f})",
            f"{math.total_mb:.0f}", f"{measured['resident_mb']:.0f}" if measured else "-",
            f"{peak:.0f}" if peak is not None else "-", f"{peak / math.total_mb:.3f}" if peak is not None else "-",
        ]
        rows.append("| " + " | ".join(cells) + " |")
    if len(peaks) == 2:
        rows.append(f"\nPeak minidream/diffusers: **{peaks['minidream']['peak_mb'] / peaks['diffusers']['peak_mb']:.3f}**")
    return rows
