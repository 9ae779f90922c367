"""The cost of sharding: train.py's step time under train.sharding=fsdp over the same run under
ddp, on N ranks (torchrun, gloo on the CPU or NCCL on GPUs), in one invocation.

Each variant is a whole `torchrun train.py` run (tiny shapes by default, random weights, the
drawn example subject without prior preservation), timed by the loop itself: `samples_per_s`
in metrics.jsonl, per metrics window. The first window (start-up) is dropped and the median of
the rest is taken; the variants run in turns, the order reversed every round.

    python -m bench.fsdp_step [--nproc 2] [--steps 24] [--rounds 2] [--resolution 64] [override ...]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import command, machine, versions
from minidream.training.example_subject import write_example_subject

TRAIN = Path(__file__).resolve().parents[1] / "train.py"
TINY = TRAIN.parent / "configs" / "tiny.yaml"
LOG_EVERY = 4


def run(folder: Path, sharding: str, args, subject: Path) -> float:
    """One torchrun train.py run; its median samples/s after the first metrics window."""
    run_dir = folder / f"run-{sharding}"
    overrides = [
        f"run.output_dir={run_dir}", f"data.instance_dir={subject}", "data.example_subject=false", "data.class_dir=null",
        f"train.max_steps={args.steps}", "validation.prompts=[]", f"run.log_every_n_steps={LOG_EVERY}",
        f"checkpoint.every_n_steps={args.steps}", f"train.sharding={sharding}", f"data.resolution={args.resolution}", *args.overrides,
    ]
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", str(TRAIN),
         "--config", str(args.config), *overrides],
        capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": str(args.threads)},
    )
    if launched.returncode:
        raise SystemExit(f"{sharding} run failed:\n{launched.stdout[-3000:]}{launched.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["samples_per_s"] for r in records if r["step"] % LOG_EVERY == 0][1:]
    return statistics.median(windows)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24, help="per run (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="ddp/fsdp pairs, order reversed each round")
    parser.add_argument("--config", type=Path, default=TINY, help="train.py preset (default: configs/tiny.yaml)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    parser.add_argument("--resolution", type=int, default=64, help="data.resolution (and the drawn images' size)")
    parser.add_argument("overrides", nargs="*", help="extra train.py overrides, e.g. train.train_text_encoder=true")
    args = parser.parse_args(argv)
    rates: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subject = folder / "subject"
        write_example_subject(subject, count=4, size=args.resolution)
        for round_index in range(args.rounds):
            for sharding in ("ddp", "fsdp") if round_index % 2 == 0 else ("fsdp", "ddp"):
                rates[sharding].append(run(folder / f"round-{round_index}", sharding, args, subject))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = medians["ddp"] / medians["fsdp"]  # step time fsdp / step time ddp
    print(f"Command: `{command('bench.fsdp_step', argv if argv is not None else sys.argv[1:])}`  \n"
          f"Machine: {machine(torch.device('cpu'))}, {args.nproc} ranks x {args.threads} thread(s)  \n{versions()}\n")
    print("| sharding | samples/s (median of windows, then of rounds) | step time vs ddp |")
    print("|---|---|---|")
    print(f"| ddp | {medians['ddp']:.2f} | 1.00 |")
    print(f"| fsdp | {medians['fsdp']:.2f} | {ratio:.2f} |")
    return medians | {"ratio": ratio}


if __name__ == "__main__":
    main()
