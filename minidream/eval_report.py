"""The files of an evaluation: eval.json's hashes, eval.md beside the paper's Table 1, the contact
sheet, and the side-by-side table of `python -m minidream.evaluate --compare`."""

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, PngImagePlugin

from minidream.diffusion.sampling import image_grid
from minidream.files import atomic_file, file_sha256
from minidream.io.weights import RUN_FOLDER_WEIGHTS

# The paper's Table 1 (Stable Diffusion rows and the real-image bound).
PAPER_TABLE = (
    ("Real images (paper)", 0.774, 0.885, None),
    ("DreamBooth, Stable Diffusion (paper)", 0.668, 0.803, 0.305),
    ("Textual Inversion, Stable Diffusion (paper)", 0.569, 0.780, 0.255),
)
SCORES = ("dino", "clip_i", "clip_t")


def pipeline_files(path: Path) -> list[Path]:
    """The files load_pipeline reads at `path`: the file, a run folder's model, or a diffusers folder's files."""
    if path.is_file():
        return [path]
    if (path / RUN_FOLDER_WEIGHTS).is_file() and not (path / "model_index.json").is_file():
        return [path / RUN_FOLDER_WEIGHTS]
    return sorted(p for p in path.rglob("*") if p.is_file())


def file_hashes(paths: Sequence[Path]) -> dict[str, str]:
    return {str(path): file_sha256(path) for path in paths}


def markdown_table(rows: Sequence[tuple[str, float | None, float | None, float | None]]) -> str:
    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = ["| | DINO | CLIP-I | CLIP-T |", "|---|---:|---:|---:|"]
    return "\n".join(lines + [f"| {name} | {cell(d)} | {cell(i)} | {cell(t)} |" for name, d, i, t in rows]) + "\n"


def report_markdown(result: dict) -> str:
    """eval.md: this run beside the paper's Table 1, then the per-prompt scores."""
    s, bound = result["settings"], result["real_vs_real"]
    run = (f"This run ({Path(s['weights']).name})", result["dino"], result["clip_i"], result["clip_t"])
    subject = ("Real images of this subject, pairs of different photos", bound["dino"], bound["clip_i"], None)
    per_prompt = "\n".join(
        f"| {i} | {p['prompt']} | {p['dino']:.3f} | {p['clip_i']:.3f} | {p['clip_t']:.3f} |"
        for i, p in enumerate(result["per_prompt"])
    )
    return (
        f"# DreamBooth evaluation\n\n{markdown_table([run, subject, *PAPER_TABLE])}\n"
        f"{len(result['per_prompt'])} prompts ({s['prompts']}) x {s['images_per_prompt']} images, seeds "
        f"{s['seed']}..{s['seed'] + s['images_per_prompt'] - 1}, {s['sampler']} {s['steps']} steps, guidance "
        f"{s['guidance']}, {s['width']}x{s['height']}; {result['real_images']} real photos. CLIP-T scores each "
        f"prompt {'with' if s['clip_t_identifier'] == 'keep' else 'without'} the identifier {s['identifier']!r}. "
        "The paper used 4 images for each of 25 prompts and 30 subjects, with its own models and settings: "
        "compare runs of one subject with each other first.\n\n"
        f"| # | prompt | DINO | CLIP-I | CLIP-T |\n|---:|---|---:|---:|---:|\n{per_prompt}\n"
    )


def contact_sheet(real: Sequence[Image.Image], images: Sequence[Sequence[Image.Image]], thumb: int = 128) -> Image.Image:
    """One row of real photos, then one row per prompt, each image a thumb x thumb square."""

    def square(image: Image.Image) -> Image.Image:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return image.crop((left, top, left + side, top + side)).resize((thumb, thumb), Image.Resampling.BICUBIC)

    columns = max(len(real), max(len(group) for group in images))
    rows = [list(real), *images]
    cells = [square(row[c]) if c < len(row) else Image.new("RGB", (thumb, thumb), "white") for row in rows for c in range(columns)]
    return image_grid(cells, columns)


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_png(path: Path, image: Image.Image, parameters: str | None = None) -> None:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    with atomic_file(path) as temporary:
        image.save(temporary, format="PNG", pnginfo=info)


def compare_table(paths: Sequence[Path]) -> str:
    """A side-by-side table of several eval.json files, and the paper's rows."""
    rows, details = [], []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text(encoding="utf-8"))
            rows.append((str(path), *(float(result[name]) for name in SCORES)))
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: not an eval.json written by python -m minidream.evaluate") from None
        s = result.get("settings", {})
        details.append(
            f"- {path}: {s.get('weights')}, {len(result.get('per_prompt', []))} prompts x {s.get('images_per_prompt')} "
            f"images, {s.get('sampler')} {s.get('steps')} steps, guidance {s.get('guidance')}, seed {s.get('seed')}"
        )
    return markdown_table([*rows, *PAPER_TABLE]) + "\n" + "\n".join(details) + "\n"
