"""Class images for prior preservation, generated with the base model before training.

Image k is always `class-NNNNN.png` made from seed k, so a rerun (or a resumed run) only
makes what is missing and makes the same images; ranks split the missing indices. With buckets,
image k's size is the k-th of buckets.proportional_sizes (the instance images' proportions), so
it too depends only on k and the data.
"""

from pathlib import Path

from tqdm.auto import tqdm

from minidream.diffusion.sampling import generate
from minidream.files import atomic_file
from minidream.models.pipeline import Pipeline
from minidream.training.buckets import Size
from minidream.training.data import find_images


def class_image_path(class_dir: Path, index: int) -> Path:
    return Path(class_dir) / f"class-{index:05d}.png"


def missing_class_indices(class_dir: Path, num_class_images: int) -> list[int]:
    """Indices still to generate so the folder holds `num_class_images` images.

    Images the user put there count too; generated names are skipped where they exist.
    """
    class_dir = Path(class_dir)
    have = len(find_images(class_dir, "class")) if class_dir.is_dir() else 0
    missing, index = [], 0
    while have + len(missing) < num_class_images:
        if not class_image_path(class_dir, index).exists():
            missing.append(index)
        index += 1
    return missing


def generate_class_images(
    pipe: Pipeline,
    class_dir: Path,
    prompt: str,
    indices: list[int],
    resolution: int,
    steps: int,
    guidance: float,
    sampler: str,
    batch_size: int,
    show_progress: bool,
    sizes: list[Size] | None = None,
) -> None:
    """Generate and write the class images of `indices` (this rank's share), each atomically;
    image k at sizes[k] (width, height) when given, else square at `resolution`."""
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    by_size: dict[Size, list[int]] = {}  # a generate() batch is of one size
    for index in indices:
        by_size.setdefault(sizes[index] if sizes else (resolution, resolution), []).append(index)
    chunks = [(size, group[i : i + batch_size]) for size, group in by_size.items() for i in range(0, len(group), batch_size)]
    with tqdm(total=len(indices), desc="class images", disable=not show_progress) as bar:
        for (width, height), chunk in chunks:
            images = generate(
                pipe, [prompt] * len(chunk), seeds=chunk, steps=steps, sampler=sampler,
                guidance=guidance, height=height, width=width,
            )
            for index, image in zip(chunk, images):
                with atomic_file(class_image_path(class_dir, index)) as tmp:
                    image.save(tmp, format="PNG")
            bar.update(len(chunk))
