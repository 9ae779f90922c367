"""Aspect-ratio buckets: image sizes of about resolution^2 pixels, and which images go to which.

Sizes are (width, height). Each image goes to the bucket nearest its aspect ratio (in log ratio),
is resized to cover it (scale = max(bw / w, bh / h)) and cropped minimally. Instance images are
never upscaled: one whose scale would exceed 1 is refused (data.scan_images). The data order of
one-bucket batches is in order.py.
"""

import math

Size = tuple[int, int]


def bucket_sizes(resolution: int, step: int, max_aspect: float) -> list[Size]:
    """For each width (a multiple of step) the tallest height (a multiple of step) with w * h <= resolution^2,
    kept when the aspect ratio is within [1 / max_aspect, max_aspect]. Sorted by aspect ratio, widest last."""
    area = resolution * resolution
    sizes = []
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height >= step and 1 / max_aspect <= width / height <= max_aspect:
            sizes.append((width, height))
    return sorted(sizes, key=lambda s: s[0] / s[1])


def log_aspect(size: Size) -> float:
    return math.log(size[0] / size[1])


def nearest_bucket(size: Size, buckets: list[Size]) -> Size:
    """The bucket nearest in log aspect ratio (ties: the squarer one, earlier in `buckets` order)."""
    return min(buckets, key=lambda b: (abs(log_aspect(b) - log_aspect(size)), abs(log_aspect(b))))


def cover_scale(size: Size, bucket: Size) -> float:
    """The resize factor that makes an image of `size` cover `bucket`."""
    return max(bucket[0] / size[0], bucket[1] / size[1])


def merge_small_buckets(counts: dict[Size, int], group: int) -> dict[Size, Size]:
    """Bucket -> the bucket it trains in. A bucket with fewer than `group` items (one global batch)
    would never train: it joins the nearest bucket (log aspect) that is large enough, or, when none
    is yet, the nearest one; repeated until every bucket left holds a batch (or only one is left)."""
    target = {b: b for b in counts}
    sizes = dict(counts)
    while len(sizes) > 1 and min(sizes.values()) < group:
        small = min(sizes, key=lambda b: (sizes[b], -abs(log_aspect(b))))  # ties: the least square goes first
        others = [b for b in sizes if b != small]
        large = [b for b in others if sizes[b] >= group] or others
        into = min(large, key=lambda b: (abs(log_aspect(b) - log_aspect(small)), abs(log_aspect(b))))
        sizes[into] += sizes.pop(small)
        target = {b: into if t == small else t for b, t in target.items()}
    return target


def proportional_sizes(count: int, weights: dict[Size, int]) -> list[Size]:
    """`count` sizes in proportion to `weights`: image k gets the bucket furthest below its share of
    the first k + 1 (largest-deficit apportionment), so any prefix is proportional and image k's
    size depends only on k and the weights: a rerun that makes more images keeps the earlier ones."""
    total = sum(weights.values())
    given = dict.fromkeys(sorted(weights), 0)
    sizes = []
    for k in range(count):
        bucket = max(given, key=lambda b: weights[b] * (k + 1) / total - given[b])
        given[bucket] += 1
        sizes.append(bucket)
    return sizes
