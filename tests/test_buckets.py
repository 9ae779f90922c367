"""Aspect-ratio buckets on real photos: the bucket set, assignment, no upscaling, one shape per
batch, the data order across ranks, small buckets merged, class images at the buckets' sizes."""

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from photo_sets import SQUARE, write_crops, write_two_subjects
from PIL import Image

from minidream.config import TINY
from minidream.models.pipeline import random_pipeline
from minidream.training.batches import DreamBoothBatches, LatentSource
from minidream.training.buckets import (
    bucket_sizes,
    cover_scale,
    merge_small_buckets,
    nearest_bucket,
    proportional_sizes,
)
from minidream.training.data import DataError, Example, place, scan_images
from minidream.training.plan import pair_classes, plan_items
from minidream.training.prior import class_image_path, generate_class_images
from minidream.training.order import Cursor, RankOrder, bucketed_order, epoch_generator

TINY_BUCKETS = [(48, 80), (64, 64), (80, 48)]  # resolution 64, step 16, max aspect 2


@given(st.sampled_from([64, 256, 512, 768, 1024]), st.sampled_from([8, 16, 32, 64]), st.floats(1.0, 4.0))
def test_buckets_are_multiples_of_the_step_at_most_the_area_and_within_the_aspect_limit(resolution, step, max_aspect):
    sizes = bucket_sizes(resolution, step, max_aspect)
    assert len(set(sizes)) == len(sizes)
    for w, h in sizes:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution**2 < w * (h + step)  # the tallest multiple of step under the area
        assert 1 / max_aspect <= w / h <= max_aspect
    assert [w / h for w, h in sizes] == sorted(w / h for w, h in sizes)
    if resolution % step == 0:
        assert (resolution, resolution) in sizes


def test_sd_buckets_at_512():
    sizes = bucket_sizes(512, 64, 2.0)
    assert sizes == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]  # 704x320 is 2.2:1
    assert bucket_sizes(64, 16, 2.0) == TINY_BUCKETS


@pytest.mark.parametrize(
    "size, bucket",
    [((1200, 800), (640, 384)), ((800, 1200), (384, 640)), ((1000, 1000), (512, 512)), ((1100, 900), (576, 448)),
     ((3000, 1000), (640, 384)), ((900, 1100), (448, 576))],
)
def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio(size, bucket):
    buckets = bucket_sizes(512, 64, 2.0)
    assert nearest_bucket(size, buckets) == bucket
    distances = sorted(abs(math.log(b[0] / b[1]) - math.log(size[0] / size[1])) for b in buckets)
    assert abs(math.log(bucket[0] / bucket[1]) - math.log(size[0] / size[1])) == distances[0]


def test_real_photos_cropped_to_mixed_aspects_are_placed_covering_their_bucket_without_upscaling(tmp_path):
    """Crops of the dog photos at 3:2, 1:1, 2:3, 16:9 (and sizes around 512 px), scanned with the
    SD 1.5 buckets: each covers its bucket at a scale of at most 1, then is cropped minimally."""
    shapes = [(768, 512), (600, 600), (512, 768), (1024, 576), (700, 560)]
    write_crops(tmp_path / "mixed", "dog", shapes)
    buckets = bucket_sizes(512, 64, 2.0)
    examples = scan_images(tmp_path / "mixed", "p", 512, skip_bad=False, what="instance", buckets=buckets)
    assert [e.size for e in examples] == shapes
    assert [nearest_bucket(e.size, buckets) for e in examples] == [(640, 384), (512, 512), (384, 640), (640, 384), (576, 448)]
    for example in examples:
        bucket = nearest_bucket(example.size, buckets)
        assert cover_scale(example.size, bucket) <= 1
        placement = place(example.size, bucket, center_crop=True, flip=False, generator=None)
        assert placement.resized[0] >= bucket[0] and placement.resized[1] >= bucket[1]
        assert bucket[0] in placement.resized or bucket[1] in placement.resized  # cropped along one side only
        with Image.open(example.path) as image:
            assert placement.apply(image).size == bucket


def test_an_image_that_would_be_upscaled_into_its_bucket_is_refused_with_its_name(tmp_path):
    write_crops(tmp_path / "small", "cat", [(768, 512), (600, 360), (512, 512)])  # 600x360 < 640x384
    with pytest.raises(DataError, match=r"1 image\(s\) smaller than their bucket \(never upscaled\): 01.png \(600x360 < bucket 640x384\)"):
        scan_images(tmp_path / "small", "p", 512, skip_bad=False, what="instance", buckets=bucket_sizes(512, 64, 2.0))


def test_the_bucketed_order_gives_one_bucket_per_global_batch_and_ranks_their_slices():
    buckets = [(48, 80)] * 5 + [(64, 64)] * 7 + [(80, 48)] * 3
    group = 2  # batch 1 x 2 ranks
    def bucketed(epoch, seed):
        return bucketed_order(buckets, group, epoch_generator(seed, epoch))

    order = bucketed(3, 5)
    assert len(order) == 4 + 6 + 2 and len(set(order)) == len(order)
    runs = [order[i : i + group] for i in range(0, len(order), group)]
    assert all(len({buckets[i] for i in run}) == 1 for run in runs)
    assert bucketed(3, 5) == order and bucketed(4, 5) != order
    # A bucket's incomplete tail sits out an epoch; the shuffle rotates which items do.
    assert len(set().union(*(bucketed(e, 5) for e in range(6)))) == len(buckets)
    # Rank r takes position r of each global batch: the two ranks' items of a step form one batch.
    shards = [order[r::2] for r in range(2)]
    assert all(sorted([shards[0][j], shards[1][j]]) == sorted(runs[j]) for j in range(len(runs)))


def test_a_bucket_smaller_than_a_global_batch_joins_the_nearest_large_enough_one():
    merged = merge_small_buckets({(48, 80): 1, (64, 64): 6, (80, 48): 4, (96, 32): 1}, group=4)
    assert merged == {(48, 80): (64, 64), (64, 64): (64, 64), (80, 48): (80, 48), (96, 32): (80, 48)}
    assert merge_small_buckets({(64, 64): 1, (80, 48): 1}, group=4) == {(64, 64): (64, 64), (80, 48): (64, 64)}


def test_class_image_sizes_follow_the_instance_proportions_and_depend_on_the_index_only():
    weights = {(48, 80): 1, (64, 64): 2, (80, 48): 1}
    sizes = proportional_sizes(12, weights)
    assert [sizes.count(b) for b in sorted(weights)] == [3, 6, 3]
    assert proportional_sizes(5, weights) == sizes[:5]  # a rerun asking for more keeps the first ones
    for k in range(1, 13):  # every prefix within one image of its share
        assert all(abs(sizes[:k].count(b) - k * w / 4) < 1 for b, w in weights.items())


def test_class_images_are_generated_at_their_sizes(tmp_path):
    pipe = random_pipeline(TINY, seed=0)
    sizes = proportional_sizes(3, {(48, 80): 1, (80, 48): 2})
    generate_class_images(pipe, tmp_path, "a toy", [0, 1, 2], 64, steps=2, guidance=7.5, sampler="ddim", batch_size=2,
                          show_progress=False, sizes=sizes)
    assert [Image.open(class_image_path(tmp_path, k)).size for k in range(3)] == sizes


def test_every_batch_of_an_epoch_is_one_shape_and_class_images_share_their_instance_bucket(tmp_path):
    data = write_two_subjects(tmp_path)
    instances = [scan_images(data / name, f"a photo of {name}", 64, False, "instance", buckets=TINY_BUCKETS) for name in ("dog", "cat")]
    classes = [scan_images(data / f"class-{name}", "c", 64, False, "class", use_captions=False, buckets=TINY_BUCKETS)
               for name in ("dog", "cat")]
    plan = plan_items(["dog", "cat"], instances, [1, 1], [4, 4], TINY_BUCKETS, 64, group=2)
    plan = pair_classes(plan, classes)
    assert plan.bucket_counts() == {(48, 80): 2, (64, 64): 4, (80, 48): 2}
    for item in plan.items:  # the class sets were cut at the instance shapes: each pairs within its bucket
        assert nearest_bucket(plan.classes[item.klass].size, TINY_BUCKETS) == item.bucket
        assert plan.classes[item.klass].path.parent.name == f"class-{plan.subjects[item.subject]}"
    vae = random_pipeline(TINY, seed=0).vae
    batches = DreamBoothBatches(plan, LatentSource(vae, False, True, 0.18215, None), seed=0, caption_dropout=0.0, masks=False)
    order, cursor, shapes = RankOrder(plan, seed=0, rank=0, world_size=1), Cursor(), set()
    assert order.length == 8  # every bucket holds whole global batches
    for _ in range(2 * order.length // 2):  # two epochs of batches of 2
        items, cursor = order.take(cursor, 2)
        batch = batches.batch(items)
        assert batch.latents.shape[0] == 4 and len(batch.prompts) == 4
        width, height = plan.items[items[0].index].bucket
        assert batch.latents.shape[1:] == (4, height // 8, width // 8)
        shapes.add(batch.latents.shape[2:])
        assert batch.subjects.sum(1).tolist() == [1.0, 1.0]
    assert shapes == {torch.Size([10, 6]), torch.Size([8, 8]), torch.Size([6, 10])}


def test_an_image_its_merged_bucket_would_upscale_is_refused_before_training():
    squares = [Example(Path(f"s{i}.png"), "p", SQUARE) for i in range(4)]
    lone = Example(Path("tall.png"), "p", (60, 100))  # its 48x80 bucket alone: merged into 64x64, which needs 64 px across
    with pytest.raises(DataError, match=r"instance images: 1 image\(s\) smaller than the bucket their small bucket merged into "
                                        r"\(never upscaled\): tall.png \(60x100 < bucket 64x64\); add images of that shape"):
        plan_items(["s"], [[*squares, lone]], [1], [0], TINY_BUCKETS, 64, group=2)
    plan = plan_items(["s"], [[*squares, Example(Path("tall.png"), "p", (80, 134))]], [1], [0], TINY_BUCKETS, 64, group=2)
    assert plan.bucket_counts() == {(64, 64): 5} and plan.merged[(48, 80)] == (64, 64)
    assert "bucket 48x80 holds less than a global batch (2): merged into 64x64" in plan.describe()
