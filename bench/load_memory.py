"""Peak RAM while loading an SD 1.5- or SDXL-shaped fp16 single file, against the file's size.

    python -m bench.load_memory [--config sd15|sdxl] [--dtype keep|fp32]

Writes a random fp16 `.safetensors` of those shapes (SD 1.5: 2.1 GB, SDXL: 6.9 GB, every key a
minidream export holds) to a temporary folder, then loads it
with `minidream.load_pipeline` in a fresh Python process and reports that process's resident
memory (VmRSS / VmHWM from /proc/self/status) above its baseline after `import minidream.io.weights`:
right after loading, and after reading every weight once (as the first forward pass does; the
weights are memory-mapped, so loading alone reads almost nothing). Linux only.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 1024**3


def memory_kib() -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of this process, in KiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def write_random(path: Path, config_name: str) -> None:
    """Every tensor of the model's single file, random fp16 (values do not matter here), written
    from meta-device models one tensor at a time, so the writer holds one copy."""
    import torch
    from safetensors.torch import save_file

    from minidream.config import ARCHITECTURES
    from minidream.io.single_file import single_file_tensors
    from minidream.models.pipeline import random_pipeline

    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        layout = single_file_tensors(random_pipeline(ARCHITECTURES[config_name]), None)
    tensors = {
        key: (0.02 * torch.randn(meta.shape, generator=generator)).half() if meta.is_floating_point()
        else torch.zeros(meta.shape, dtype=meta.dtype)
        for key, meta in layout.items()
    }
    save_file(tensors, path, metadata={"format": "pt"})


def measure(path: Path, dtype_name: str) -> dict:
    import torch

    from minidream.io.weights import load_pipeline

    baseline = memory_kib()["VmRSS"]
    pipe = load_pipeline(path, dtype=None if dtype_name == "keep" else torch.float32)
    after_load = memory_kib()["VmHWM"]
    with torch.no_grad():  # read every weight once, one fp32 copy of one tensor at a time
        for model in (pipe.unet, pipe.vae, *pipe.text_encoders):
            for param in model.parameters():
                param.float().sum()
    return {
        "baseline_kib": baseline,
        "peak_above_baseline_after_load_kib": after_load - baseline,
        "peak_above_baseline_after_reading_all_weights_kib": memory_kib()["VmHWM"] - baseline,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dtype", choices=("keep", "fp32"), default="keep", help="load as stored (fp16) or cast to fp32"
    )
    parser.add_argument("--config", choices=("sd15", "sdxl"), default="sd15", help="the shapes of the file")
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # child process: make the file
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child process: load it
    args = parser.parse_args()
    if args.write is not None:
        write_random(args.write, args.config)
        return
    if args.measure is not None:
        print(json.dumps(measure(args.measure, args.dtype)))
        return

    with tempfile.TemporaryDirectory(prefix="minidream-bench-") as folder:
        path = Path(folder) / f"{args.config}-random-fp16.safetensors"
        # Separate processes: the writer's memory must not count, and the reader starts clean.
        subprocess.run([sys.executable, __file__, "--write", str(path), "--config", args.config], check=True)
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(path), "--dtype", args.dtype],
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(child.stdout.strip().splitlines()[-1])
        size = path.stat().st_size

    print(f"file: {args.config} shapes, fp16, {size / GIB:.2f} GiB; loaded with dtype={args.dtype}")
    print(f"baseline RSS after `import minidream.io.weights`: {result['baseline_kib'] / 1024**2:.2f} GiB")
    for label, key in (("after load_pipeline", "peak_above_baseline_after_load_kib"),
                       ("after reading every weight", "peak_above_baseline_after_reading_all_weights_kib")):
        peak = result[key] * 1024
        print(f"peak RSS above baseline {label}: {peak / GIB:.2f} GiB = {peak / size:.2f} x file size")


if __name__ == "__main__":
    main()
