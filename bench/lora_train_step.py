"""LoRA training step, minidream against diffusers + PEFT: speed, memory and checkpoint size.

One step: the forward under autocast in --dtype (the frozen base in that dtype, fp32 adapters on
the attention's to_q/k/v/out as in train_dreambooth_lora.py), MSE loss, backward, a fused AdamW
step on the adapters only. Both UNets hold the same base Parameters and adapters of equal values,
so the first step's losses must agree (checked). SDXL shapes (--config sdxl) get the pooled
vector and time ids too: minidream's y, diffusers' added_cond_kwargs. Parts:
  speed       the two steps timed alternating in this process (the ratio minidream/diffusers)
  memory      each step's peak in a process of its own, what autograd saves for backward, and the
              arithmetic of the peak
  checkpoint  a LoRA checkpoint written as train.py writes it, against a full fine-tune's size
"""

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from bench.common import (
    SD15_TFLOP,
    Row,
    Settings,
    command,
    latent_scale,
    parser,
    report,
    settings_from,
    time_alternating,
)
from bench.lora_checkpoint import checkpoint_rows, lora_checkpoint
from bench.lora_memory import (
    MEMORY_HEADER,
    STEPS,
    arithmetic,
    measure_peak,
    memory_rows,
)
from bench.lora_models import LoRAPair, adapter_parameter_count, lora_pair
from bench.memory import child_figures
from bench.models import IMPLEMENTATIONS, VectorConditioning, unet_forward
from bench.saved_tensors import saved_bytes
from bench.unet_train_step import make_optimizer, train_step, training_inputs, vector_inputs

PARTS = ("speed", "memory", "checkpoint")
# Relative difference allowed between the two first-step losses: the same math, summed in other orders.
LOSS_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


class LossMismatch(RuntimeError):
    """The two implementations' first losses differ: they do not compute the same step."""


def lora_runs(
    pair: LoRAPair, inputs, settings: Settings, vector: VectorConditioning | None
) -> dict[str, Callable[[], torch.Tensor]]:
    """One training step of each implementation, each with its own fused AdamW over its adapters;
    `vector`: SDXL's pooled embedding and time ids (None for models without them)."""
    runs = {}
    for impl in IMPLEMENTATIONS:
        params = pair.adapters[impl]
        runs[impl] = partial(train_step, unet_forward(impl, pair.unet, pair.twin, vector), inputs, params,
                             make_optimizer(params, "adamw"), settings)
    return runs


def first_losses(runs: dict[str, Callable[[], torch.Tensor]], dtype: torch.dtype) -> dict[str, float]:
    """Each implementation's first step (from the same adapters); raises LossMismatch unless the
    losses agree to LOSS_RTOL."""
    losses = {impl: run().item() for impl, run in runs.items()}
    difference = abs(losses["minidream"] - losses["diffusers"]) / abs(losses["diffusers"])
    if not difference <= LOSS_RTOL[dtype]:
        raise LossMismatch(f"first-step losses differ by {difference:.2e} (relative, > {LOSS_RTOL[dtype]:g}): {losses}")
    return losses


def speed_row(seconds: dict[str, float], batch: int, latent: int, rank: int, settings: Settings) -> Row:
    # Model FLOPs: the forward, and a backward to the activations only (no weight gradients for the
    # frozen base) of about one forward's; the adapters' share is negligible.
    tflop = 2 * SD15_TFLOP["unet_forward"] * batch * latent_scale(latent, latent)
    return Row(
        benchmark=f"UNet LoRA train step (rank {rank}, attention)", shape=f"batch {batch}, latent {latent}x{latent}",
        items=batch, unit="samples/s", tflop_per_call=tflop if settings.config_name == "sd15" else None,
        minidream_s=seconds["minidream"], diffusers_s=seconds["diffusers"],
    )


def options() -> argparse.ArgumentParser:
    options = parser(__doc__.splitlines()[0])
    options.set_defaults(dtype="bf16")
    options.add_argument("--resolution", type=int, default=None,
                         help="image size in pixels (latents: /8); default 512 on CUDA, 256 on the CPU")
    options.add_argument("--batch", type=int, default=2, help="default 2: one instance and one class image")
    options.add_argument("--rank", type=int, default=4, help="LoRA rank (alpha = rank)")
    options.add_argument("--gradient-checkpointing", action="store_true", help="on in both models")
    options.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    options.add_argument("--steps", type=int, default=STEPS,
                         help="steps in each memory process (default %(default)s; AdamW's state exists from step 1 on)")
    options.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    return options


def latent_size(args: argparse.Namespace, settings: Settings) -> int:
    resolution = args.resolution or (512 if settings.device.type == "cuda" else 256)
    return resolution // 8


def child_step(impl: str, args: argparse.Namespace, settings: Settings) -> Callable[[], torch.Tensor]:
    pair = lora_pair(settings, args.rank, args.gradient_checkpointing)
    latent = latent_size(args, settings)
    inputs = training_inputs(settings, args.batch, latent)
    return lora_runs(pair, inputs, settings, vector_inputs(settings, args.batch, latent))[impl]


def describe(args: argparse.Namespace, settings: Settings, latent: int) -> str:
    checkpointing = ", gradient checkpointing" if args.gradient_checkpointing else ""
    return (f"{settings.describe()}, batch {args.batch}, latent {latent}x{latent} ({8 * latent} px), "
            f"rank {args.rank} on to_q/k/v/out{checkpointing}")


def main(argv: list[str] | None = None) -> dict:
    """Prints each part's table; returns the figures by part."""
    argv = sys.argv[1:] if argv is None else argv
    args = options().parse_args(argv)
    settings = settings_from(args)
    if args.child:
        print(json.dumps(measure_peak(partial(child_step, args.child, args, settings), settings, args.steps)))
        return {}
    latent = latent_size(args, settings)
    command_line = command(__spec__.name, argv)
    # The peaks first, before this process holds any model of its own.
    peaks = {impl: child_figures(__spec__.name, impl, argv) for impl in IMPLEMENTATIONS} if "memory" in args.parts else {}
    results: dict = {}
    if {"speed", "memory"} & set(args.parts):
        pair = lora_pair(settings, args.rank, args.gradient_checkpointing)
        inputs = training_inputs(settings, args.batch, latent)
        vector = vector_inputs(settings, args.batch, latent)
        runs = lora_runs(pair, inputs, settings, vector)
        results["losses"] = first_losses(runs, settings.dtype)
        print(f"\nSetup: {describe(args, settings, latent)}; adapters: "
              f"{adapter_parameter_count(pair, 'minidream'):,} parameters (minidream), "
              f"{adapter_parameter_count(pair, 'diffusers'):,} (PEFT)")
        print("First-step loss: " + ", ".join(f"{impl} {loss:.6f}" for impl, loss in results["losses"].items()))
    if "speed" in args.parts:
        results["speed"] = [speed_row(time_alternating(runs, settings), args.batch, latent, args.rank, settings)]
        report(results["speed"], settings, command_line)
    if "memory" in args.parts:
        saved = {impl: saved_bytes(unet_forward(impl, pair.unet, pair.twin, vector), inputs, pair.parameters(impl), settings)
                 for impl in IMPLEMENTATIONS}
        figures = {impl: arithmetic(pair, impl, saved[impl]) for impl in IMPLEMENTATIONS}
        results["memory"] = {"peaks": peaks, "saved": saved, "arithmetic": figures}
        measure_name = "CUDA max_memory_allocated" if settings.device.type == "cuda" else "peak RSS above the post-import RSS"
        print(f"\nMemory: `{command_line}` ({measure_name}, {args.steps} steps, one process per implementation; "
              "saved for backward: one forward's activations and autocast's copies of the adapters)\n")
        print(MEMORY_HEADER)
        print("\n".join(memory_rows(figures, saved, peaks)))
    if "checkpoint" in args.parts:
        with tempfile.TemporaryDirectory() as run_dir:
            sizes = [(f"{targets}, rank {args.rank}", lora_checkpoint(Path(run_dir) / targets, settings.model_config.unet,
                                                                       targets, args.rank, settings.seed))
                     for targets in ("attention", "transformer")]
            print(f"\nCheckpoint size ({settings.config_name} UNet; train.py's save_checkpoint, after one AdamW step):\n")
            print("\n".join(checkpoint_rows(sizes)))
        results["checkpoint"] = sizes
    return results


if __name__ == "__main__":
    main()
