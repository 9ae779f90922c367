"""Memory per trained parameter of each optimizer option (train.optimizer x train.fused_backward).

An SD 1.5 UNet in fp32 with AdamW needs ~14 GB, so on a CPU this measures the SD 1.5 UNet
architecture at a scaled width (--channels, SD 1.5: 320) and a small latent, where the
activations are a few MB, and reports the bytes per parameter beyond the fp32 weights:

    (peak RSS of 3 training steps - RSS with the model built - activation peak) / parameters

Each option runs in a process of its own. The activation peak is measured the same way with
the weights frozen (only the input requires a gradient). The last column multiplies by SD 1.5's
859.5M UNet parameters. On CUDA it reports torch.cuda.max_memory_allocated instead of RSS.
Optimizers whose package is missing get a row saying what to install.
(bitsandbytes' CPU 8-bit step dequantizes a tensor at a time into fp32 temporaries, which its
CUDA kernel does not, so on the CPU the 8-bit rows include the largest tensor's temporaries.)
"""

import argparse
import json
import subprocess
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F

from bench.common import command, machine, versions
from bench.memory import REPO_ROOT, proc_status_mb
from minidream.config import SD15, TrainSection
from minidream.models.unet import UNet
from minidream.training.optimizers import FusedBackward, OptimizerError, make_optimizer

SD15_UNET_PARAMETERS = 859.52e6
STEPS = 3
# (name, optimizer, fused_backward); "activations" trains nothing, to subtract the activation peak.
OPTIONS = [
    ("activations", None, False),
    ("adamw", "adamw", False),
    ("adamw + fused_backward", "adamw", True),
    ("adamw8bit", "adamw8bit", False),
    ("adamw8bit + fused_backward", "adamw8bit", True),
    ("prodigy", "prodigy", False),
    ("lion", "lion", False),
    ("lion + fused_backward", "lion", True),
    ("adamw-schedulefree", "adamw-schedulefree", False),
    ("adafactor", "adafactor", False),
    ("adafactor + fused_backward", "adafactor", True),
]


def peak_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return proc_status_mb("VmHWM") * 2**20


def measure(option: str, channels: int, latent: int, device: torch.device) -> dict:
    """In this process: build the scaled UNet, take STEPS training steps, return the figures."""
    _, optimizer_name, fused = next(o for o in OPTIONS if o[0] == option)
    torch.manual_seed(0)
    unet = UNet(replace(SD15.unet, model_channels=channels)).to(device).train()
    params = list(unet.parameters())
    count = sum(p.numel() for p in params)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else proc_status_mb("VmRSS") * 2**20

    def make(groups):
        return make_optimizer(groups, TrainSection(optimizer=optimizer_name))  # train.py's default settings

    groups = [{"params": params, "lr": 1e-6}]
    if optimizer_name is None:
        unet.requires_grad_(False)
        step = None
    elif fused:
        step = FusedBackward(groups, make)
    else:
        step = make(groups)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent, latent, generator=g).to(device).requires_grad_(optimizer_name is None)
    t = torch.randint(0, 1000, (1,), generator=g).to(device)
    context = torch.randn(1, 77, SD15.unet.context_dim, generator=g).to(device)
    target = torch.randn(1, 4, latent, latent, generator=g).to(device)
    for _ in range(STEPS):
        F.mse_loss(unet(x, t, context), target).backward()  # with fused_backward, this is the step
        if isinstance(step, torch.optim.Optimizer):
            step.step()
            step.zero_grad(set_to_none=True)
        x.grad = None
    return {"parameters": count, "extra_bytes": peak_bytes(device) - baseline}


def run_child(option: str, args: argparse.Namespace) -> dict | str:
    argv = ["--channels", str(args.channels), "--latent", str(args.latent), "--threads", str(args.threads)]
    if args.device:
        argv += ["--device", args.device]
    result = subprocess.run(
        [sys.executable, "-m", __spec__.name, *argv, "--child", option], cwd=REPO_ROOT, capture_output=True, text=True
    )
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    if result.returncode != 0 or not last.startswith("{"):
        raise RuntimeError(f"measuring {option} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    figures = json.loads(last)
    return figures.get("unavailable") or figures


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64, help="UNet model_channels (SD 1.5: 320; default %(default)s)")
    parser.add_argument("--latent", type=int, default=8, help="latent height and width (default %(default)s)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.child:
        try:
            print(json.dumps(measure(args.child, args.channels, args.latent, device)))
        except OptimizerError as error:
            print(json.dumps({"unavailable": str(error)}))
        return {}

    results = {name: run_child(name, args) for name, _, _ in OPTIONS}
    activations = results["activations"]
    measure_name = "CUDA max_memory_allocated" if device.type == "cuda" else "peak RSS"
    print(f"\nMachine: {machine(device)}; {versions()}")
    print(f"Command: `{command(__spec__.name, argv)}` ({measure_name}, {STEPS} steps, one process per option)")
    print(f"SD 1.5 UNet architecture at model_channels={args.channels}: {activations['parameters'] / 1e6:.1f}M parameters, "
          f"latent {args.latent}x{args.latent}; activation peak {activations['extra_bytes'] / 2**20:.0f} MB (subtracted)\n")
    print("| option | MB above the fp32 weights | bytes / parameter | at SD 1.5 (859.5M parameters) |")
    print("|---|---:|---:|---:|")
    for name, figures in results.items():
        if name == "activations":
            continue
        if isinstance(figures, str):
            print(f"| {name} | - | - | not measured: {figures} |")
            continue
        extra = figures["extra_bytes"] - activations["extra_bytes"]
        per_parameter = extra / figures["parameters"]
        print(f"| {name} | {extra / 2**20:.0f} | {per_parameter:.2f} | {per_parameter * SD15_UNET_PARAMETERS / 2**30:.1f} GiB |")
    return results


if __name__ == "__main__":
    main()
