"""A drawn example subject for the embedded default run: no photos need downloading.

The "subject" is one toy — a red ball with a yellow star — drawn at different places and
sizes over different backgrounds, as a photographer's 3-5 shots of a subject would be.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from minidream.files import atomic_file
from minidream.training.data import DataError, find_images


def draw_example_subject(index: int, size: int) -> Image.Image:
    rng = np.random.default_rng(index)
    top, bottom = rng.integers(60, 230, size=(2, 3))
    # A vertical two-colour gradient background: the "scene" changes from shot to shot.
    mix = np.linspace(0.0, 1.0, size)[:, None, None]
    background = (top * (1 - mix) + bottom * mix).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(background, (size, size, 3)).copy(), "RGB")
    draw = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.22, 0.32)
    cx, cy = size * rng.uniform(0.35, 0.65, size=2)
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(205, 30, 40), outline=(90, 10, 15), width=2)
    # A five-pointed star on the ball: the subject's identifying mark.
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 0.55, 0.22) * radius
    draw.polygon([(cx + r * np.cos(a), cy - r * np.sin(a)) for r, a in zip(radii, angles)], fill=(250, 215, 40))
    return image


def write_example_subject(folder: Path, count: int, size: int) -> list[Path]:
    """Draw `count` shots of the example subject into `folder` (skipping files already there).

    A folder that holds any other image is refused: it is someone's photos, and the drawn
    subject must never be mixed into them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = {f"subject-{index:02d}.png" for index in range(count)}
    others = [p.name for p in find_images(folder, "instance") if p.name not in names]
    if others:
        raise DataError(f"{folder} holds other images ({', '.join(others[:3])}); not drawing the example subject there")
    paths = []
    for index in range(count):
        path = folder / f"subject-{index:02d}.png"
        if not path.exists():
            with atomic_file(path) as tmp:
                draw_example_subject(index, size).save(tmp, format="PNG")
        paths.append(path)
    return paths
