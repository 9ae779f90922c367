"""An epoch's items: which subject, instance image, bucket (size) and class image each training sample is.

Subject s with n instance images repeated r times and m class images lists max(n * r, m) items;
its item k shows instance image k % n, so an epoch shows every image of the larger set once
(with one subject and r = 1, exactly the order minidream always had). Subjects with equal class
sets (num_class_images, the default) thus weigh the same; without class images, set repeats.
An item's bucket is its instance image's; its class image is one of its subject's class images in
that bucket (the j-th item of the bucket takes the j-th of them, cycling), or, when the bucket has
none (a class set made before buckets), the k-th of all of them, resized and cropped to the bucket.
Class images may be upscaled for that; instance images never are.
"""

from collections import Counter
from dataclasses import dataclass, replace

from minidream.training.buckets import Size, cover_scale, merge_small_buckets, nearest_bucket
from minidream.training.data import Example, small_images_error


@dataclass(frozen=True)
class PlanItem:
    subject: int
    instance: int  # into DataPlan.instances
    bucket: Size  # (width, height) of the batch it can join
    klass: int | None = None  # into DataPlan.classes


@dataclass(frozen=True)
class DataPlan:
    subjects: tuple[str, ...]  # names, for the per-subject losses
    instances: list[Example]
    items: list[PlanItem]
    group: int  # items per global batch: batch_size x world_size
    bucketed: bool  # the epoch order is of one-bucket global batches (order.py)
    merged: dict[Size, Size]  # each instance image's nearest bucket -> the bucket it trains in
    classes: list[Example] = ()

    def bucket_counts(self, subjects: list[int] | None = None) -> dict[Size, int]:
        """Items per bucket (of `subjects` only, when given), the buckets in order."""
        counts = Counter(item.bucket for item in self.items if subjects is None or item.subject in subjects)
        return dict(sorted(counts.items()))

    def describe(self) -> list[str]:
        """The log lines: each bucket and its items, and the buckets merged away."""
        lines = [f"bucket {w}x{h}: {n} items" for (w, h), n in self.bucket_counts().items()]
        lines += [f"bucket {a[0]}x{a[1]} holds less than a global batch ({self.group}): merged into {b[0]}x{b[1]}"
                  for a, b in self.merged.items() if a != b]
        return lines


def plan_items(
    names: list[str], instance_sets: list[list[Example]], repeats: list[int], class_counts: list[int],
    buckets: list[Size] | None, resolution: int, group: int,
) -> DataPlan:
    """The items, without class images yet (pair_classes adds them once the class images exist)."""
    instances, items = [], []
    for s, (examples, repeat, n_class) in enumerate(zip(instance_sets, repeats, class_counts)):
        first = len(instances)
        instances += examples
        nearest = [nearest_bucket(e.size, buckets) if buckets else (resolution, resolution) for e in examples]
        items += [PlanItem(s, first + k % len(examples), nearest[k % len(examples)])
                  for k in range(max(len(examples) * repeat, n_class))]
    merged = merge_small_buckets(Counter(item.bucket for item in items), group)
    items = [replace(item, bucket=merged[item.bucket]) for item in items]
    upscaled = sorted({f"{instances[i.instance].path} ({instances[i.instance].size[0]}x{instances[i.instance].size[1]} "
                       f"< bucket {i.bucket[0]}x{i.bucket[1]})"
                       for i in items if cover_scale(instances[i.instance].size, i.bucket) > 1})
    if upscaled:
        raise small_images_error("instance images", upscaled, "smaller than the bucket their small bucket merged into "
                                 "(never upscaled)", "add images of that shape or lower train.batch_size")
    return DataPlan(tuple(names), instances, items, group, buckets is not None, merged)


def pair_classes(plan: DataPlan, class_sets: list[list[Example]]) -> DataPlan:
    """The plan with each item's class image (see the module docstring)."""
    used = list(plan.bucket_counts())  # sorted
    classes, first = [], []
    for examples in class_sets:
        first.append(len(classes))
        classes += examples
    in_bucket: dict[tuple[int, Size], list[int]] = {}  # (subject, bucket) -> its class images there
    for s, examples in enumerate(class_sets):
        for j, example in enumerate(examples):
            in_bucket.setdefault((s, nearest_bucket(example.size, used)), []).append(j)
    seen: dict[tuple[int, Size], int] = {}
    index_in_subject = [0] * len(class_sets)
    items = []
    for item in plan.items:
        s = item.subject
        own = in_bucket.get((s, item.bucket), [])
        j = seen.get((s, item.bucket), 0)
        pick = own[j % len(own)] if own else index_in_subject[s] % len(class_sets[s])
        seen[(s, item.bucket)] = j + 1
        index_in_subject[s] += 1
        items.append(replace(item, klass=first[s] + pick))
    return replace(plan, items=items, classes=classes)
