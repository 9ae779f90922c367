"""Class-image generation: only what is missing, the same image for the same index."""

from PIL import Image

from minidream.config import TINY
from minidream.models.pipeline import random_pipeline
from minidream.training.prior import (
    class_image_path,
    generate_class_images,
    missing_class_indices,
)


def test_missing_indices_count_user_images_and_skip_existing_names(tmp_path):
    assert missing_class_indices(tmp_path / "absent", 3) == [0, 1, 2]
    Image.new("RGB", (8, 8)).save(tmp_path / "users-own.jpg")
    Image.new("RGB", (8, 8)).save(class_image_path(tmp_path, 1))
    assert missing_class_indices(tmp_path, 4) == [0, 2]
    assert missing_class_indices(tmp_path, 2) == []


def test_generation_is_idempotent_and_split_work_gives_the_same_images(tmp_path):
    pipe = random_pipeline(TINY, seed=0)
    settings = dict(prompt="a photo of a toy", resolution=32, steps=3, guidance=7.5, sampler="ddim", show_progress=False)
    generate_class_images(pipe, tmp_path / "one", indices=[0, 1, 2], batch_size=1, **settings)
    # Two "ranks" taking every other index make byte-identical files (batched matmuls may round
    # differently, so the batch size is kept the same).
    for rank in (0, 1):
        generate_class_images(pipe, tmp_path / "split", indices=[0, 1, 2][rank::2], batch_size=1, **settings)
    for index in range(3):
        assert class_image_path(tmp_path / "one", index).read_bytes() == class_image_path(tmp_path / "split", index).read_bytes()
    assert missing_class_indices(tmp_path / "one", 3) == []
    assert not list((tmp_path / "one").glob("*.tmp"))
    first, second = (Image.open(class_image_path(tmp_path / "one", i)) for i in (0, 1))
    assert first.size == (32, 32) and first.tobytes() != second.tobytes()  # each index its own seed
