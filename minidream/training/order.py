"""The data order and each sample's randomness: the reason resume is exact and N ranks equal one process.

Three rules, all here:
- **The epoch order is global.** One shuffle per epoch, seeded by (seed, epoch) alone
  (`epoch_generator`): the items in random order, or with buckets runs of one-bucket global
  batches in random order. It never depends on the number of ranks.
- **The cursor is global.** `Cursor` counts the items all ranks together have taken; rank r
  takes positions r, r + W, r + 2W, ... of each global batch, so the global batch at position P
  holds positions P .. P + B*W - 1 whatever W is, and a checkpoint resumes on any W that divides
  the global batch.
- **Every sample owns its randomness.** Its generator is keyed by (seed, epoch, its position
  in the epoch's order, instance/class part) (`sample_generator`): its crop, flip, VAE sample,
  timestep and noise come from it in that order, and its caption dropout from a generator of its
  own (`caption_generator`). So no draw depends on the rank or on the batch a sample lands in.
"""

from dataclasses import dataclass

import torch

from minidream.training.buckets import Size
from minidream.training.plan import DataPlan

MASK64 = (1 << 63) - 1


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's shuffle."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def sample_generator(seed: int, epoch: int, position: int, part: int) -> torch.Generator:
    """The generator of one training sample (part 0: instance image, 1: class image)."""
    key = (((seed * 1_000_003 + epoch) * 1_000_003 + position) * 2 + part) & MASK64
    return torch.Generator("cpu").manual_seed(key)


def caption_generator(sample: torch.Generator) -> torch.Generator:
    """A generator of its own for a sample's caption dropout, keyed by the sample's key, so the
    sample's other draws (crop, flip, VAE sample, timestep, noise) are those of a run without it."""
    return torch.Generator("cpu").manual_seed((sample.initial_seed() * 1_000_003 + 1) & MASK64)


def bucketed_order(item_buckets: list[Size], group: int, generator: torch.Generator) -> list[int]:
    """One epoch's global order of item indices with buckets: each bucket's items shuffled and cut
    into runs of `group` (one global batch each; a bucket's incomplete tail sits out this epoch,
    the shuffle rotates which), then the runs shuffled."""
    runs = []
    for bucket in sorted(set(item_buckets)):
        members = [i for i, b in enumerate(item_buckets) if b == bucket]
        shuffled = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
        runs += [shuffled[k : k + group] for k in range(0, len(shuffled) - group + 1, group)]
    return [i for r in torch.randperm(len(runs), generator=generator).tolist() for i in runs[r]]


def epoch_order(plan: DataPlan, epoch: int, seed: int) -> list[int]:
    """The epoch's global order of the plan's item indices."""
    generator = epoch_generator(seed, epoch)
    if not plan.bucketed:
        return torch.randperm(len(plan.items), generator=generator).tolist()
    return bucketed_order([item.bucket for item in plan.items], plan.group, generator)


def epoch_length(plan: DataPlan) -> int:
    """How many items epoch_order lists (the same every epoch)."""
    if not plan.bucketed:
        return len(plan.items)
    buckets = [item.bucket for item in plan.items]
    return sum(buckets.count(b) // plan.group * plan.group for b in set(buckets))


@dataclass(frozen=True)
class Cursor:
    """Where the run is in the data: the epoch, and how many items of its global order all ranks
    together have used. The same on every rank and for any world size."""

    epoch: int = 0
    position: int = 0


@dataclass(frozen=True)
class Item:
    """One dataset item drawn for training: which plan item, and the key of its randomness."""

    index: int  # into DataPlan.items
    epoch: int
    position: int  # in the epoch's global order


class RankOrder:
    """This rank's share of the plan's global order: every world_size-th position from its rank.
    The tail of an epoch that does not divide evenly is dropped, so every rank runs the same steps."""

    def __init__(self, plan: DataPlan, seed: int, rank: int, world_size: int):
        self.plan, self.seed, self.rank, self.world_size = plan, seed, rank, world_size
        self.length = epoch_length(plan)
        self.epoch, self.order = None, []  # the epoch asked for last, and its order (asked every micro-step)

    def of_epoch(self, epoch: int) -> list[int]:
        """This rank's item indices for the epoch."""
        if epoch != self.epoch:
            order = epoch_order(self.plan, epoch, self.seed)
            usable = len(order) // self.world_size * self.world_size
            self.epoch, self.order = epoch, order[self.rank : usable : self.world_size]
        return self.order

    def take(self, cursor: Cursor, count: int) -> tuple[list[Item], Cursor]:
        """This rank's `count` items of the next global batch (count x world_size items), moving to
        the next epoch when the epoch's usable items run out; returns them and the run's new cursor.
        (The epoch ends at the first batch that would pass length // W * W; for any W dividing the
        global batch that is the same batch as for one process, so the order never depends on W.)"""
        world_size = self.world_size
        shard_length = self.length // world_size
        if shard_length < count:
            raise ValueError(
                f"{self.length} training items cannot give {world_size} process(es) {count} item(s) each per step; "
                "add images, or lower train.batch_size or the number of processes"
            )
        if cursor.position % world_size:
            raise ValueError(f"data position {cursor.position} cannot be split evenly over {world_size} processes")
        if cursor.position + count * world_size > shard_length * world_size:
            cursor = Cursor(cursor.epoch + 1, 0)
        order = self.of_epoch(cursor.epoch)
        first = cursor.position // world_size
        items = [Item(order[j], cursor.epoch, self.rank + j * world_size) for j in range(first, first + count)]
        return items, Cursor(cursor.epoch, cursor.position + count * world_size)
