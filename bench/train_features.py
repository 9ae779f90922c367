"""train.py's own loop with each speed feature on and off: samples/s of the real training run.

Each variant is a whole `train.py` run (tiny or SD 1.5 shapes, random weights, the drawn
example subject with class images), timed by the loop itself: `samples_per_s` in
metrics.jsonl, averaged over each metrics window. The first window (warm-up, compilation) is
dropped and the median over the remaining steps is reported. The variants of a feature run in turns,
the order reversed every round, as the other bench scripts do. Features without a config key
(fused AdamW, zero_grad(set_to_none=True), SDPA kernels) are switched off here by patching
torch for the "off" run only.
"""

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import train
from bench.common import command, machine, versions
from minidream.training.example_subject import write_example_subject


@dataclass(frozen=True)
class Feature:
    """A speed feature: the overrides that turn it off, or a patch active during the "off" run."""

    name: str
    off_overrides: tuple[str, ...] = ()
    off_patch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    on_overrides: tuple[str, ...] = ()


def unfused_adamw():
    adamw = torch.optim.AdamW
    return mock.patch.object(torch.optim, "AdamW", lambda *args, **kwargs: adamw(*args, **kwargs | {"fused": False}))


def zero_grad_to_zeros():
    zero_grad = torch.optim.Optimizer.zero_grad
    return mock.patch.object(torch.optim.Optimizer, "zero_grad", lambda self, set_to_none=True: zero_grad(self, False))


def math_attention():
    return sdpa_kernel([SDPBackend.MATH])


FEATURES = {
    "cache-latents": Feature("latent caching (train.cache_latents)", off_overrides=("train.cache_latents=false",)),
    "fewer-host-reads": Feature(
        "metrics read every 10 steps, not every step (run.log_every_n_steps)", off_overrides=("run.log_every_n_steps=1",)
    ),
    "fused-adamw": Feature("fused AdamW (off: for-each)", off_patch=unfused_adamw),
    "set-to-none": Feature("zero_grad(set_to_none=True) (off: zero-filled gradients)", off_patch=zero_grad_to_zeros),
    "sdpa": Feature("fused SDPA kernels (off: the math kernel)", off_patch=math_attention),
    "compile": Feature("torch.compile of the UNet (train.compile)", on_overrides=("train.compile=true",)),
}


def samples_per_s(run_dir: Path, warmup_steps: int) -> float:
    """The median over the steps after the first `warmup_steps` of each step's rate (its metrics
    window's average), so runs with different windows are judged on the same steps."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["samples_per_s"] for r in records if r["step"] > warmup_steps)


def run_variant(root: Path, name: str, overrides: tuple[str, ...], patch, args) -> float:
    """The samples/s of one train.py run, its first metrics window left out."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    argv = [
        "--config", str(train.DEFAULT_CONFIG), f"run.output_dir={run_dir}", "run.resume=none",
        f"model.architecture={args.config}", f"data.resolution={args.resolution}",
        f"data.instance_dir={root / 'subject'}", f"data.class_dir={root / 'class'}", f"data.num_class_images={args.class_images}",
        "data.class_steps=2", f"train.max_steps={args.steps}", f"train.batch_size={args.batch}", f"train.device={args.device}",
        f"train.mixed_precision={args.precision}", f"checkpoint.every_n_steps={args.steps}", "validation.prompts=[]",
        f"run.log_every_n_steps={args.log_every}", *overrides,
    ]
    with patch(), contextlib.redirect_stdout(sys.stderr):
        if train.main(argv) != 0:
            raise RuntimeError(f"train.py failed for {name}: {' '.join(argv)}")
    rate = samples_per_s(run_dir, warmup_steps=args.log_every)
    shutil.rmtree(run_dir)  # at SD 1.5 each run leaves a checkpoint and an export of several GB
    return rate


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    argv = sys.argv[1:] if argv is None else argv
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--features", nargs="+", choices=FEATURES, default=list(FEATURES))
    options.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    options.add_argument("--config", default="tiny", choices=["tiny", "sd15"])
    options.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"], help="train.mixed_precision")
    options.add_argument("--resolution", type=int, default=64)
    options.add_argument("--batch", type=int, default=2, help="instance images per step (class images double it)")
    options.add_argument("--class-images", type=int, default=4)
    options.add_argument("--steps", type=int, default=50)
    options.add_argument("--log-every", type=int, default=10, help="the metrics window; its first one is dropped")
    options.add_argument("--repeats", type=int, default=3, help="runs of each variant, alternating")
    options.add_argument("--threads", type=int, default=None)
    args = options.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.steps < 2 * args.log_every:
        options.error("--steps must cover at least two metrics windows (2 x --log-every)")

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_example_subject(root / "subject", count=4, size=max(args.resolution, 64))
        for key in args.features:
            feature = FEATURES[key]
            variants = {
                "on": (feature.on_overrides, contextlib.nullcontext),
                "off": (feature.off_overrides, feature.off_patch),
            }
            rates = {name: [] for name in variants}
            for round_index in range(args.repeats):
                for name in variants if round_index % 2 == 0 else reversed(variants):
                    overrides, patch = variants[name]
                    rates[name].append(run_variant(root, f"{key}-{name}", overrides, patch, args))
            results[key] = (statistics.median(rates["on"]), statistics.median(rates["off"]))

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    print(f"\nMachine: {machine(device)}; {versions()}")
    print(f"Command: `{command(__spec__.name, argv)}` (median over windows of {args.log_every} steps, "
          f"the first dropped; median of {args.repeats} runs per variant, alternating)\n")
    print("| feature | on: samples/s | off: samples/s | on/off speed-up |\n|---|---:|---:|---:|")
    for key, (on, off) in results.items():
        print(f"| {FEATURES[key].name} | {on:.2f} | {off:.2f} | **{on / off:.3f}** |")
    return results


if __name__ == "__main__":
    main()
