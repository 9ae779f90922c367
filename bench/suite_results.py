"""What `bench.gpu_suite` measured: one record per stage, kept as one JSON file and one markdown
file ready to paste into BENCHMARKS.md. Both are rewritten whole (temp name, then rename) after
every figure, so a run cut short still leaves everything it measured."""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.common import TABLE_HEADER, Row, Settings, mfu, mfu_percent, table_row
from bench.memory import MEMORY_HEADER, MemoryRow, memory_table_row
from minidream.files import atomic_file

# The project's GPU targets (README / issue 20), checked against the figures where measured.
TRAINING_TARGET_BATCH = 8
TRAINING_TARGET_SPEEDUP = 1.3  # x diffusers' samples/s, same mode
TRAINING_TARGET_MFU = 40.0  # % of the bf16 dense peak
SAMPLING_TARGET_STEPS_PER_S = 100.0  # batch 1 with guidance


@dataclass(frozen=True)
class RecipePeak:
    """Peak memory of one train.py run of the SD 1.5 recipe."""

    recipe: str  # "full" | "lora"
    overrides: tuple[str, ...]  # on top of configs/dreambooth-sd15.yaml
    steps: int
    peak_allocated_mb: float | None  # train.py's own peak_memory_gb (CUDA max_memory_allocated); None on a CPU
    peak_rss_mb: float  # the process's peak resident set (host memory)
    wall_s: float


@dataclass
class StageRecord:
    number: int
    title: str
    status: str = "not run"  # done | partial (some measurements skipped) | skipped | failed
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    timings: list[tuple[Row, Settings]] = field(default_factory=list)
    memory: list[tuple[MemoryRow, Settings]] = field(default_factory=list)
    recipes: list[RecipePeak] = field(default_factory=list)

    def has_figures(self) -> bool:
        return bool(self.timings or self.memory or self.recipes)


@dataclass
class SuiteRecord:
    command: str
    machine: str
    gpu: str | None
    versions: dict[str, str | None]
    peak_tflops: float | None
    budget_s: float
    timing: str  # how each time was taken
    elapsed_s: float = 0.0
    finished: bool = False
    measurements: list[dict] = field(default_factory=list)  # kind, what, seconds (model builds and compiles included)
    stages: list[StageRecord] = field(default_factory=list)


def timing_dict(row: Row, settings: Settings) -> dict:
    return asdict(row) | {
        "setup": settings.describe(),
        "compiled": settings.compile,
        "minidream_per_s": row.items / row.minidream_s,
        "diffusers_per_s": row.items / row.diffusers_s,
        "speedup_vs_diffusers": row.diffusers_s / row.minidream_s,
        "mfu_minidream_pct": mfu_percent(row, row.minidream_s, settings),
        "mfu_diffusers_pct": mfu_percent(row, row.diffusers_s, settings),
    }


def memory_dict(row: MemoryRow, settings: Settings) -> dict:
    return asdict(row) | {"setup": settings.describe(), "compiled": settings.compile, "ratio": row.ratio}


def suite_dict(record: SuiteRecord) -> dict:
    fields = {name: value for name, value in vars(record).items() if name != "stages"}
    stages = [
        {
            "number": stage.number, "title": stage.title, "status": stage.status, "seconds": stage.seconds,
            "notes": stage.notes,
            "timings": [timing_dict(row, settings) for row, settings in stage.timings],
            "memory": [memory_dict(row, settings) for row, settings in stage.memory],
            "recipes": [asdict(recipe) for recipe in stage.recipes],
        }
        for stage in record.stages
    ]
    return fields | {"stages": stages}


def _megabytes(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


RECIPE_HEADER = (
    "| train.py recipe | overrides | steps | peak allocated MB | peak RSS MB | wall s |\n|---|---|---:|---:|---:|---:|"
)


def recipe_row(recipe: RecipePeak) -> str:
    cells = [
        recipe.recipe, " ".join(f"`{o}`" for o in recipe.overrides), str(recipe.steps),
        _megabytes(recipe.peak_allocated_mb), _megabytes(recipe.peak_rss_mb), f"{recipe.wall_s:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def target_lines(record: SuiteRecord) -> list[str]:
    """Each target, met or not, per mode measured; no verdict off a GPU."""
    on_gpu = record.gpu is not None
    rows = [(row, settings) for stage in record.stages for row, settings in stage.timings]

    def verdict(met: bool) -> str:
        return ("**met**" if met else "**not met**") if on_gpu else "no verdict off a GPU"

    training = []
    for row, settings in rows:
        if row.benchmark.startswith("UNet train step") and row.items == TRAINING_TARGET_BATCH:
            speedup, percent = row.diffusers_s / row.minidream_s, mfu_percent(row, row.minidream_s, settings)
            met = speedup >= TRAINING_TARGET_SPEEDUP and percent is not None and percent >= TRAINING_TARGET_MFU
            mode = "compiled" if settings.compile else "eager"
            training.append(f"{mode}: {speedup:.2f}x, MFU {mfu(row, row.minidream_s, settings)} ({verdict(met)})")
    sampling = []
    for row, settings in rows:
        if row.benchmark.startswith("DDIM loop"):
            rate = row.items / row.minidream_s
            mode = "compiled" if settings.compile else "eager"
            sampling.append(f"{mode}: {rate:.1f} steps/s ({verdict(rate >= SAMPLING_TARGET_STEPS_PER_S)})")
    return [
        f"- Training at batch {TRAINING_TARGET_BATCH}, >= {TRAINING_TARGET_SPEEDUP}x diffusers' samples/s and "
        f">= {TRAINING_TARGET_MFU:.0f}% MFU: " + ("; ".join(training) or "not measured"),
        f"- Sampling, batch 1 with guidance, >= {SAMPLING_TARGET_STEPS_PER_S:.0f} denoising steps/s: "
        + ("; ".join(sampling) or "not measured"),
    ]


def flops_line(record: SuiteRecord) -> str:
    """The model FLOPs behind the MFU figures, one per benchmark and shape (bench.models.unet_tflop)."""
    known = {
        f"{row.benchmark}, {row.shape}": row.tflop_per_call
        for stage in record.stages for row, _ in stage.timings if row.tflop_per_call is not None
    }
    listed = "; ".join(f"{what}: {tflop:.4g} TFLOP" for what, tflop in known.items()) or "none known"
    return f"- Model FLOPs per call (SD 1.5: DESIGN.md's; other shapes: counted by torch's FlopCounterMode): {listed}"


def markdown(record: SuiteRecord) -> str:
    peak = f"{record.peak_tflops:g} TFLOP/s bf16 dense (datasheet, by the GPU's name)" if record.peak_tflops else "unknown"
    state = "finished" if record.finished else "still running or cut short"
    lines = [
        f"## GPU suite: {record.machine}",
        "",
        f"- Command: `{record.command}`",
        "- Versions: " + ", ".join(f"{name} {value}" for name, value in record.versions.items() if value),
        f"- Peak for MFU: {peak}",
        flops_line(record),
        f"- Timing: {record.timing}",
        f"- Budget {record.budget_s:.0f} s, {record.elapsed_s:.0f} s used ({state})",
        "",
        "Targets:",
        *target_lines(record),
    ]
    for stage in record.stages:
        lines += ["", f"### {stage.number}. {stage.title} ({stage.status}, {stage.seconds:.0f} s)", ""]
        if stage.timings:
            lines += [TABLE_HEADER, *(table_row(row, settings) for row, settings in stage.timings), ""]
        if stage.memory:
            lines += ["Peak memory (CUDA max_memory_allocated over one step: weights, AdamW state, gradients, activations):", ""]
            lines += [MEMORY_HEADER, *(memory_table_row(row, settings) for row, settings in stage.memory), ""]
        if stage.recipes:
            lines += [RECIPE_HEADER, *(recipe_row(recipe) for recipe in stage.recipes), ""]
        lines += [f"- {note}" for note in stage.notes]
    return "\n".join(lines).rstrip() + "\n"


def write(record: SuiteRecord, out_dir: Path) -> tuple[Path, Path]:
    """gpu_suite.json and gpu_suite.md in `out_dir`, each replaced whole."""
    paths = out_dir / "gpu_suite.json", out_dir / "gpu_suite.md"
    with atomic_file(paths[0]) as tmp:
        tmp.write_text(json.dumps(suite_dict(record), indent=1) + "\n")
    with atomic_file(paths[1]) as tmp:
        tmp.write_text(markdown(record))
    return paths
