"""Every GPU figure in one command, within a time budget: SD 1.5 shapes, random weights, 512 px,
bf16, minidream against diffusers in the same process (`--config sdxl`: SDXL base at 1024 px).

    python -m bench.gpu_suite                                          # on the GPU: 480 s at most
    python -m bench.gpu_suite --device cpu --config tiny --budget 60   # the CPU rehearsal (tests/test_gpu_suite.py)
    bash bench/gpu_suite.sh                                            # on the lent GPU machine: see bench/GPU.md
    bash bench/gpu_suite.sh --config sdxl                              # SDXL at 1024 px, in a call of its own

Stages, in order, each printing its figures as soon as it has them:
  1. the UNet training step (forward, MSE, backward, fused AdamW; fp32 master weights under
     bf16 autocast) at batch 1 and 8, eager then compiled: samples/s, MFU, peak memory;
  2. the DDIM loop, 25 steps, batch 1, guidance 7.5, eager then compiled: denoising steps/s
     (CUDA graphs once sample.py offers them);
  3. peak memory of train.py itself on its own recipes for 3 steps (random weights): SD 1.5's
     full and LoRA (configs/dreambooth-sd15.yaml), SDXL's configs/dreambooth-sdxl.yaml and
     dreambooth-lora-sdxl.yaml;
  4. VAE decode, batch 1.
SDXL's training step runs at batch 1 only. MFU counts DESIGN.md's model FLOPs for SD 1.5
and FlopCounterMode's for other shapes (bench.models.unet_tflop).
Every measurement has an estimate: a fixed one for its kind and scale (SCALES), replaced by the
time the same kind took once measured (each is listed under "measurements" in the JSON). It runs only when its estimate fits in the budget left
after setting aside the estimates of the later stages' first measurements, so a long compile
cannot starve the cheap stages after it; otherwise it is skipped with a message. A stage that
fails is recorded with its error and the next one runs. Results go to --out as gpu_suite.json
and gpu_suite.md (markdown for BENCHMARKS.md), rewritten after every figure.
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

import sample
from bench import suite_results
from bench.common import (
    Row,
    Settings,
    device_peak_tflops,
    machine,
    mfu,
    time_alternating,
    version_numbers,
)
from bench.memory import MemoryRow, cuda_peak_mb
from bench.models import compile_in_place, unet_pair, vae_pair
from bench.sampling_loop import largest_difference, sampling_row, sampling_runs
from bench.suite_results import RecipePeak, StageRecord, SuiteRecord
from bench.unet_train_step import (
    make_optimizer,
    training_models,
    training_row,
    training_runs,
)
from bench.vae import vae_row, vae_runs
from minidream.training.example_subject import write_example_subject

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
RECIPE_STEPS = 3  # AdamW allocates its state in step 1; later steps hold it alongside gradients and activations
GUIDANCE = 7.5


@dataclass(frozen=True)
class Scale:
    """How big each measurement is, and how long each kind is expected to take until measured."""

    latent: int  # latent side; images are 8x that
    batches: tuple[int, ...]
    sampling_steps: int
    warmup: int
    repeats: int
    estimates: dict[str, float]  # seconds, by measurement kind (model builds and compiles included)
    # Stage 3's train.py runs: name -> (the config in configs/, overrides); the SD 1.5 recipe by default.
    recipes: dict[str, tuple[str, tuple[str, ...]]] = dataclasses.field(default_factory=lambda: SD_RECIPES)


SD_RECIPES = {"full": ("dreambooth-sd15.yaml", ()), "lora": ("dreambooth-sd15.yaml", ("lora.rank=4",))}
# SDXL's own recipes. The full one with plain AdamW (fused into backward): the lent machine has no
# bitsandbytes for the recipe's adamw8bit, and 2.57B weights x 12 bytes (weights and moments) fit 80 GB.
SDXL_RECIPES = {"full": ("dreambooth-sdxl.yaml", ("train.optimizer=adamw",)), "lora": ("dreambooth-lora-sdxl.yaml", ())}

SCALES = {
    # Guesses for an H100/H200 with ~16 CPU cores (compiling two UNets' forward and backward
    # dominates); correct them from the "seconds" of a real run's gpu_suite.json.
    "sd15": Scale(
        latent=64, batches=(1, 8), sampling_steps=25, warmup=2, repeats=5,
        estimates={
            "training eager": 40, "training compiled": 180, "sampling eager": 30, "sampling compiled": 100,
            "train.py recipe": 60, "vae decode": 20,
        },
    ),
    "tiny": Scale(
        latent=8, batches=(1, 8), sampling_steps=10, warmup=1, repeats=2,
        estimates={
            "training eager": 3, "training compiled": 6, "sampling eager": 3, "sampling compiled": 4,
            "train.py recipe": 12, "vae decode": 2,
        },
    ),
    # SDXL base at its 1024 px. Batch 1 only: fp32 weights, gradients and AdamW state take 41 GB
    # before activations, and an H100 has 80. The estimates are guesses, as sd15's.
    "sdxl": Scale(
        latent=128, batches=(1,), sampling_steps=25, warmup=2, repeats=5,
        estimates={
            "training eager": 90, "training compiled": 300, "sampling eager": 40, "sampling compiled": 150,
            "train.py recipe": 240, "vae decode": 30,
        },
        recipes=SDXL_RECIPES,
    ),
    "tiny-sdxl": Scale(
        latent=8, batches=(1, 8), sampling_steps=10, warmup=1, repeats=2,
        estimates={
            "training eager": 3, "training compiled": 8, "sampling eager": 3, "sampling compiled": 5,
            "train.py recipe": 15, "vae decode": 2,
        },
        recipes=SDXL_RECIPES,
    ),
}


class Budget:
    """Seconds left of the total, and each kind's expected duration (the last measured, else the fixed guess)."""

    def __init__(self, total_s: float, estimates: dict[str, float]):
        self.total_s = total_s
        self.estimates = dict(estimates)
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def refusal(self, kind: str, reserved_kinds: list[str]) -> str | None:
        """Why a measurement of `kind` may not start now, or None if it fits."""
        need, reserve = self.estimates[kind], sum(self.estimates[k] for k in reserved_kinds)
        left = self.total_s - self.elapsed()
        if need + reserve <= left:
            return None
        aside = f", {reserve:.0f} s of it set aside for the later stages" if reserve else ""
        return f"estimated {need:.0f} s, {left:.0f} s of the {self.total_s:.0f} s budget left{aside}"

    def record(self, kind: str, seconds: float) -> None:
        self.estimates[kind] = seconds


class Suite:
    """The run's settings, budget and record, and the printing and writing as figures come in."""

    def __init__(self, args: argparse.Namespace, argv: list[str], device: torch.device):
        self.scale = SCALES[args.config]
        self.base = Settings(
            device=device, dtype_name="bf16", config_name=args.config, compile=False, channels_last=False,
            warmup=self.scale.warmup, repeats=self.scale.repeats,
            peak_tflops=args.peak_tflops or device_peak_tflops(device), seed=args.seed,
            compile_backend=args.compile_backend or ("inductor" if device.type == "cuda" else "eager"),
        )
        self.budget = Budget(args.budget, self.scale.estimates)
        self.out = args.out
        self.scratch = args.scratch
        self.later_first_kinds: list[str] = []  # set by main before each stage
        timing = (
            f"medians of {self.base.repeats} alternating runs after {self.base.warmup} warm-up call(s) of each "
            f"(compiled: torch.compile backend {self.base.compile_backend}, static shapes)"
        )
        self.record = SuiteRecord(
            command=shlex.join(["python", "-m", "bench.gpu_suite", *argv]), machine=machine(device),
            gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None, versions=version_numbers(),
            peak_tflops=self.base.peak_tflops, budget_s=args.budget, timing=timing,
        )

    def settings(self, compiled: bool) -> Settings:
        return dataclasses.replace(self.base, compile=compiled)

    def fits(self, stage: StageRecord, kind: str, what: str) -> bool:
        refusal = self.budget.refusal(kind, self.later_first_kinds)
        if refusal is not None:
            self.note(stage, f"{what}: skipped ({refusal})")
        return refusal is None

    @contextlib.contextmanager
    def timed(self, kind: str, what: str) -> Iterator[None]:
        """Time a measurement: the budget's next estimate for its kind, and the record's list
        (what the fixed estimates should be corrected to)."""
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.budget.record(kind, seconds)
        self.record.measurements.append({"kind": kind, "what": what, "seconds": round(seconds, 1)})

    def note(self, stage: StageRecord, message: str) -> None:
        print(f"  {message}", flush=True)
        stage.notes.append(message)
        self.save()

    def add_timing(self, stage: StageRecord, label: str, row: Row, settings: Settings) -> None:
        def side(name: str, seconds: float) -> str:
            return f"{name} {1000 * seconds:.1f} ms ({row.items / seconds:.2f} {row.unit}, MFU {mfu(row, seconds, settings)})"

        print(f"  {label}: {side('minidream', row.minidream_s)}, {side('diffusers', row.diffusers_s)}; "
              f"minidream runs at {row.diffusers_s / row.minidream_s:.3f}x diffusers' rate", flush=True)
        stage.timings.append((row, settings))
        self.save()

    def add_memory(self, stage: StageRecord, label: str, row: MemoryRow, settings: Settings) -> None:
        print(f"  {label}, peak memory: minidream {row.minidream_mb:.0f} MB, diffusers {row.diffusers_mb:.0f} MB "
              f"(ratio {row.ratio:.3f})", flush=True)
        stage.memory.append((row, settings))
        self.save()

    def peaks(self, runs: dict[str, Callable[[], object]], settings: Settings) -> dict[str, float] | None:
        """Each implementation's CUDA peak over one call; None off a GPU (one process holds both)."""
        if settings.device.type != "cuda":
            return None
        return {impl: cuda_peak_mb(run, 1, settings.device) for impl, run in runs.items()}

    def save(self) -> None:
        self.record.elapsed_s = self.budget.elapsed()
        suite_results.write(self.record, self.out)


def mode_name(compiled: bool) -> str:
    return "compiled" if compiled else "eager"


class TrainingModels:
    """The fp32 UNet pair, its parameters and one fused AdamW: built on first use, compiled in place once."""

    def __init__(self):
        self.built = None
        self.compiled = False

    def get(self, settings: Settings) -> tuple:
        if self.built is None:
            unet, twin = training_models(settings, gradient_checkpointing=False)
            params = list(unet.parameters())
            self.built = unet, twin, params, make_optimizer(params, "adamw")
        if settings.compile and not self.compiled:
            compile_in_place(settings, *self.built[:2])
            self.compiled = True
        return self.built


def training_stage(suite: Suite, stage: StageRecord) -> None:
    """Eager at each batch, then compiled, the largest batch first (where the target is)."""
    models = TrainingModels()
    for compiled in (False, True):
        kind = f"training {mode_name(compiled)}"
        for batch in sorted(suite.scale.batches, reverse=compiled):
            label = f"{mode_name(compiled)}, batch {batch}"
            if not suite.fits(stage, kind, label):
                continue
            with suite.timed(kind, label):
                settings = suite.settings(compiled)
                runs = training_runs(settings, *models.get(settings), batch, suite.scale.latent)
                seconds = time_alternating(runs, settings)
                peaks = suite.peaks(runs, settings)
            row = training_row("UNet train step", batch, suite.scale.latent, seconds, settings)
            suite.add_timing(stage, label, row, settings)
            if peaks is not None:
                memory = MemoryRow("UNet train step", row.shape, peaks["minidream"], peaks["diffusers"])
                suite.add_memory(stage, label, memory, settings)


def cli_accepts(entry: Callable[[list[str]], object], argv: list[str]) -> bool:
    """Whether a command line is accepted: argparse exits on an unknown flag, train.py returns 2 on
    an unknown config key. Its output is discarded."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            result = entry(argv)
        except SystemExit as exit_:
            return exit_.code in (0, None)
    return not (isinstance(result, int) and result != 0)


def sampling_stage(suite: Suite, stage: StageRecord) -> None:
    """The same pair of bf16 UNets, eager, then compiled in place."""
    built = None
    for compiled in (False, True):
        kind = f"sampling {mode_name(compiled)}"
        if not suite.fits(stage, kind, mode_name(compiled)):
            continue
        with suite.timed(kind, mode_name(compiled)):
            settings = suite.settings(compiled)
            if built is None:
                built = unet_pair(settings, settings.dtype)
            if compiled:
                compile_in_place(settings, *built)
            runs = sampling_runs(settings, *built, 1, suite.scale.latent, suite.scale.sampling_steps, GUIDANCE)
            difference = largest_difference(runs)  # also the first (compiling) call of each
            seconds = time_alternating(runs, settings)
        row = sampling_row(1, suite.scale.latent, suite.scale.sampling_steps, GUIDANCE, seconds, settings)
        suite.add_timing(stage, mode_name(compiled), row, settings)
        suite.note(stage, f"{mode_name(compiled)}: final latents, max |minidream - diffusers| = {difference:.2e}")
    if cli_accepts(sample.parse_args, ["--weights", "-", "--prompt", "-", "--cuda-graphs"]):
        suite.note(stage, "CUDA graphs: sample.py now accepts --cuda-graphs; this suite does not time them yet")
    else:
        suite.note(stage, "CUDA graphs: not timed, sample.py offers none (no --cuda-graphs option)")


def recipe_overrides(suite: Suite, root: Path) -> list[str]:
    """A recipe made to run 3 steps on random weights of the suite's model, here, without validation."""
    config, device = suite.base.config_name, suite.base.device
    return [
        f"model.architecture={config}", "model.weights=null", f"data.resolution={8 * suite.scale.latent}",
        f"data.instance_dir={root / 'instance'}", f"data.class_dir={root / 'class'}", "data.num_class_images=2",
        f"train.max_steps={RECIPE_STEPS}", f"train.device={device.type}", f"checkpoint.every_n_steps={RECIPE_STEPS}",
        "checkpoint.keep_last=1", "validation.prompts=[]", "run.log_every_n_steps=1", "run.resume=none",
        f"run.output_dir={root / 'run'}",
    ]


def run_recipe(suite: Suite, name: str, config: str, extra: tuple[str, ...]) -> RecipePeak:
    """One train.py process; its peak RSS from the kernel (wait4), its CUDA peak from its metrics.jsonl."""
    suite.scratch.mkdir(parents=True, exist_ok=True)
    # At SD 1.5 the run writes a checkpoint with AdamW state and an export: ~13 GB, removed after.
    with tempfile.TemporaryDirectory(prefix=f"gpu-suite-{name}-", dir=suite.scratch) as tmp:
        root = Path(tmp)
        for folder in ("instance", "class"):  # drawn images, so train.py neither draws nor generates any
            write_example_subject(root / folder, count=2, size=8 * suite.scale.latent)
        argv = [sys.executable, "train.py", "--config", str(CONFIGS / config), *recipe_overrides(suite, root), *extra]
        start = time.perf_counter()
        with open(root / "train.log", "w") as log:
            process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped above: Popen must not wait again
        wall = time.perf_counter() - start
        if process.returncode != 0:
            tail = (root / "train.log").read_text()[-3000:]
            raise RuntimeError(f"train.py {name} recipe failed (exit {process.returncode}): {shlex.join(argv)}\n{tail}")
        records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    peaks = [r["peak_memory_gb"] * 1024 for r in records if "peak_memory_gb" in r]
    return RecipePeak(
        recipe=name, overrides=(f"model.architecture={suite.base.config_name}", "model.weights=null", *extra),
        steps=len(records), peak_allocated_mb=max(peaks) if peaks else None,
        peak_rss_mb=usage.ru_maxrss / 1024, wall_s=wall,  # ru_maxrss is in KiB on Linux
    )


def recipes_stage(suite: Suite, stage: StageRecord) -> None:
    for name, (config, extra) in suite.scale.recipes.items():
        if not suite.fits(stage, "train.py recipe", f"train.py {name} recipe"):
            continue
        with suite.timed("train.py recipe", name):
            recipe = run_recipe(suite, name, config, extra)
        allocated = "-" if recipe.peak_allocated_mb is None else f"{recipe.peak_allocated_mb:.0f} MB"
        print(f"  train.py {name} recipe, {recipe.steps} steps: peak allocated {allocated}, "
              f"peak RSS {recipe.peak_rss_mb:.0f} MB, {recipe.wall_s:.0f} s", flush=True)
        stage.recipes.append(recipe)
        suite.save()
    if suite.base.device.type == "cuda":
        suite.note(stage, "against diffusers: the peak-memory rows of stage 1 (same step, same weights)")


def vae_stage(suite: Suite, stage: StageRecord) -> None:
    if not suite.fits(stage, "vae decode", "VAE decode"):
        return
    image = 8 * suite.scale.latent
    with suite.timed("vae decode", "batch 1"):
        settings = suite.settings(compiled=False)
        runs = vae_runs(settings, *vae_pair(settings, settings.dtype), 1, image)["decode"]
        with torch.no_grad():
            seconds = time_alternating(runs, settings)
    suite.add_timing(stage, "eager, batch 1", vae_row("decode", 1, image, seconds, settings), settings)


@dataclass(frozen=True)
class Stage:
    title: str
    run: Callable[[Suite, StageRecord], None]
    first_kind: str  # the kind of its first measurement, set aside by the stages before it


STAGES = {
    1: Stage("Training step, batch 1 and 8, eager and compiled", training_stage, "training eager"),
    2: Stage("Sampling loop, DDIM, batch 1, guidance 7.5, eager and compiled", sampling_stage, "sampling eager"),
    3: Stage("Peak memory of train.py's own recipes, 3 steps", recipes_stage, "train.py recipe"),
    4: Stage("VAE decode, batch 1", vae_stage, "vae decode"),
}


def release_memory(device: torch.device) -> None:
    """Drop the compiled graphs and cached blocks of a finished stage (train.py needs the GPU next)."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_args(argv: list[str]) -> argparse.Namespace:
    options = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    options.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    options.add_argument("--config", choices=SCALES, default="sd15", help="model shapes and sizes (default: sd15)")
    options.add_argument("--budget", type=float, default=480.0, help="total seconds (default: %(default)s)")
    options.add_argument("--stages", type=int, nargs="+", choices=STAGES, default=list(STAGES), help="default: all")
    options.add_argument("--out", type=Path, default=Path("bench-results"), help="where the JSON and markdown go")
    options.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()), help="train.py's run folders")
    options.add_argument("--peak-tflops", type=float, default=None, help="default: by the GPU's name (else MFU unknown)")
    options.add_argument("--compile-backend", default=None, help="default: inductor on a GPU, eager (dynamo only) on a CPU")
    options.add_argument("--seed", type=int, default=0)
    args = options.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        options.error("--device cuda: torch sees no CUDA GPU")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # diffusers' upsampler calls lru_cache'd helpers, which dynamo traces through; it warns every compile.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    suite = Suite(args, argv, device)
    record = suite.record
    print(f"{record.machine}; " + ", ".join(f"{k} {v}" for k, v in record.versions.items() if v), flush=True)
    print(f"budget {args.budget:.0f} s; writing {args.out}/gpu_suite.json and gpu_suite.md", flush=True)
    numbers = sorted(args.stages)
    for index, number in enumerate(numbers):
        stage = STAGES[number]
        suite.later_first_kinds = [STAGES[n].first_kind for n in numbers[index + 1 :]]
        stage_record = StageRecord(number, stage.title)
        record.stages.append(stage_record)
        print(f"\n== {number}. {stage.title} ({suite.budget.elapsed():.0f} s in) ==", flush=True)
        start = time.perf_counter()
        try:
            stage.run(suite, stage_record)
        except Exception as error:  # one stage's failure must not cost the others' figures
            traceback.print_exc()
            stage_record.status = "failed"
            stage_record.notes.append(f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        else:
            skipped = any(": skipped (" in note for note in stage_record.notes)
            stage_record.status = ("partial" if skipped else "done") if stage_record.has_figures() else "skipped"
        stage_record.seconds = time.perf_counter() - start
        release_memory(device)
        suite.save()
    record.finished = True
    suite.save()
    print(f"\nwrote {args.out}/gpu_suite.json and gpu_suite.md ({record.elapsed_s:.0f} s)\n")
    print(suite_results.markdown(record), end="")
    return 1 if any(stage.status == "failed" for stage in record.stages) else 0


if __name__ == "__main__":
    sys.exit(main())
