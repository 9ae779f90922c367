"""Where a training sample comes from: the DreamBooth data of a run, in two phases and one call per step.

    data = DreamBoothData.scan(cfg, env)      # before any model loads: every data problem surfaces here
    data.prepare(pipe, amp)                   # after: class images, pairing, the latent store
    batch, cursor = data.next(cursor)         # each micro-step: the batch on the device, no host read

`scan` finds the subjects (subjects.py), checks every photo, mask and bucket (data.py, masks.py,
buckets.py) and any class images already there, and plans the epoch's items with the class counts
the folders will have (plan.py). `prepare` generates the missing class images with the base model
(prior.py; the ranks split them), pairs each item with its class image, and chooses where encoded
images are kept (batches.py, latent_cache.py). `next` takes this rank's items in the global order
(order.py: why resume is exact and N ranks equal one process) and makes the batch.
"""

from pathlib import Path

from minidream.config import TrainConfig, check_image_size
from minidream.models.pipeline import Pipeline
from minidream.training.batches import Batch, DreamBoothBatches, LatentSource, MomentsInMemory
from minidream.training.buckets import Size, bucket_sizes, proportional_sizes
from minidream.training.data import Example, find_images
from minidream.training.distributed import Distributed, barrier, gather_objects, log
from minidream.training.example_subject import write_example_subject
from minidream.training.latent_cache import LatentCache, check_writable_folder
from minidream.training.order import Cursor, RankOrder
from minidream.training.plan import DataPlan, pair_classes, plan_items
from minidream.training.prior import generate_class_images, missing_class_indices
from minidream.training.step import to_device
from minidream.training.subjects import Subject, class_count, class_sets, scan_classes, scan_subject, subjects_of


class DreamBoothData:
    """The run's subjects, their photos and class images, the plan of an epoch's items, and the batch maker."""

    def __init__(self, cfg: TrainConfig, env: Distributed, subjects: list[Subject], buckets: list[Size] | None,
                 instance_sets: list[list[Example]], class_examples: dict[str, list[Example]]):
        self.cfg, self.env, self.subjects, self.buckets = cfg, env, subjects, buckets
        self.instance_sets = instance_sets
        self.class_examples = class_examples  # class folder -> its images (scanned once they exist)
        self.prior = subjects[0].class_dir is not None  # subjects_of: for every subject, or none
        self.shared = class_sets(subjects)  # class folder -> the subjects sharing it
        self.wanted = {folder: max(subjects[i].num_class_images for i in sharing) for folder, sharing in self.shared.items()}
        # The items with the class counts the folders will have: bucket problems surface now too.
        self.class_counts = [class_count(s.class_dir, self.wanted[s.class_dir]) if self.prior else 0 for s in subjects]
        self.plan = self._plan(self.class_counts)
        self.store = None
        self.batches: DreamBoothBatches | None = None
        self.order: RankOrder | None = None

    @classmethod
    def scan(cls, cfg: TrainConfig, env: Distributed) -> "DreamBoothData":
        """Everything about the data that can be wrong, found before any model loads."""
        data = cfg.data
        check_image_size(data.resolution, data.resolution, f"data.resolution={data.resolution}")
        if data.example_subject and not data.subjects and env.is_main:  # config_file.with_instance_dir: a folder of the run's own
            write_example_subject(Path(data.instance_dir), count=4, size=max(data.resolution, 64))
        barrier()
        subjects = subjects_of(cfg)
        buckets = bucket_sizes(data.resolution, data.bucket_step, data.max_aspect) if data.buckets else None
        instance_sets = [scan_subject(subject, data, buckets) for subject in subjects]
        class_examples = {}
        for folder, sharing in class_sets(subjects).items():
            if Path(folder).is_dir() and find_images(folder, "class"):  # class images already there must be usable too
                class_examples[folder] = scan_classes(folder, subjects[sharing[0]], data, buckets)
        if data.latent_cache_dir is not None:
            check_writable_folder(Path(data.latent_cache_dir))
        return cls(cfg, env, subjects, buckets, instance_sets, class_examples)

    def _plan(self, class_counts: list[int]) -> DataPlan:
        cfg, subjects = self.cfg, self.subjects
        return plan_items([s.name for s in subjects], self.instance_sets, [s.repeats for s in subjects], class_counts,
                          self.buckets, cfg.data.resolution, cfg.train.batch_size * self.env.world_size)

    def prepare(self, pipe: Pipeline, amp) -> None:
        """With the base model loaded: the class images made and paired, and the batch maker built."""
        data, env = self.cfg.data, self.env
        if self.prior:
            self._ensure_class_images(pipe, amp)
            sets = [self.class_examples[s.class_dir] for s in self.subjects]
            counts = [len(examples) for examples in sets]  # fewer than planned where bad files were skipped
            self.plan = pair_classes(self.plan if counts == self.class_counts else self._plan(counts), sets)
        if self.buckets is not None:
            for line in self.plan.describe():
                log(env, line)
        self.store = moments_store(self.cfg, pipe)
        latents = LatentSource(pipe.vae, data.center_crop, data.random_flip, pipe.config.vae.scaling_factor, self.store)
        self.batches = DreamBoothBatches(self.plan, latents, self.cfg.train.seed, data.caption_dropout, data.masks)
        self.order = RankOrder(self.plan, self.cfg.train.seed, env.rank, env.world_size)

    def _ensure_class_images(self, pipe: Pipeline, amp) -> None:
        """Generate the class images prior preservation needs, once per class folder, split across
        ranks; with buckets at the bucket sizes, in the proportions of the instance images of the
        subjects sharing it. A folder that changed is scanned (again)."""
        data, env = self.cfg.data, self.env
        for folder, sharing in self.shared.items():
            missing = missing_class_indices(Path(folder), self.wanted[folder]) if env.is_main else None
            missing = gather_objects(missing)[0]
            if missing:
                prompt = self.subjects[sharing[0]].class_prompt
                sizes = proportional_sizes(max(missing) + 1, self.plan.bucket_counts(sharing)) if self.buckets else None
                log(env, f"generating {len(missing)} class images of {prompt!r} into {folder}")
                with amp():
                    generate_class_images(
                        pipe, Path(folder), prompt, missing[env.rank :: env.world_size], data.resolution, data.class_steps,
                        data.class_guidance, data.class_sampler, data.class_batch_size, env.is_main, sizes=sizes,
                    )
                barrier()
            if missing or folder not in self.class_examples:
                self.class_examples[folder] = scan_classes(folder, self.subjects[sharing[0]], data, self.buckets)

    def next(self, cursor: Cursor) -> tuple[Batch, Cursor]:
        """This rank's part of the next global batch, on the device (asynchronous copies), and the new cursor."""
        items, cursor = self.order.take(cursor, self.cfg.train.batch_size)
        batch = self.batches.batch(items)
        device = self.env.device
        masks = to_device(batch.masks, device) if batch.masks is not None else None
        return batch._replace(latents=to_device(batch.latents, device), masks=masks, size_ids=to_device(batch.size_ids, device),
                              subjects=to_device(batch.subjects, device)), cursor

    @property
    def sizes(self) -> list[Size]:
        """The (width, height) the run trains at: each bucket, or the square resolution."""
        return sorted(self.plan.bucket_counts())


def moments_store(cfg: TrainConfig, pipe: Pipeline):
    """Where encoded images are kept (batches.py): on disk with data.latent_cache_dir, in memory when
    train.cache_latents and the transforms draw nothing, else nowhere (encoded every time)."""
    data = cfg.data
    if data.latent_cache_dir is not None:
        return LatentCache(Path(data.latent_cache_dir), pipe.vae)
    if cfg.train.cache_latents and data.center_crop and not data.random_flip:
        return MomentsInMemory()
    return None
