"""The data order and each sample's randomness (training/order.py): what makes resume exact and
N ranks equal one process, checked on the order alone."""

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from plain_recipe import noise_and_timesteps

from minidream.training.data import Example
from minidream.training.order import Cursor, RankOrder, epoch_order, sample_generator
from minidream.training.plan import plan_items


def plain_plan(length: int, group: int = 1):
    """A plan of `length` items without buckets (one subject, no class images)."""
    examples = [Example(Path(f"{k}.png"), "p", (64, 64)) for k in range(length)]
    return plan_items(["s"], [examples], [1], [0], None, 64, group)


def take(cursor: Cursor, count: int, length: int, seed: int, rank: int, world_size: int):
    return RankOrder(plain_plan(length), seed, rank, world_size).take(cursor, count)


def test_each_ranks_epoch_order_covers_the_epoch_once_and_is_reproducible():
    plan = plain_plan(10)
    shards = [RankOrder(plan, 7, r, 3).of_epoch(3) for r in range(3)]
    assert all(len(s) == 3 for s in shards)  # the tenth item sits out: every rank runs the same steps
    flat = sum(shards, [])
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    assert RankOrder(plan, 7, 0, 3).of_epoch(3) == shards[0]
    assert epoch_order(plan, 4, 7) != epoch_order(plan, 3, 7) and sorted(epoch_order(plan, 4, 7)) == list(range(10))


@given(st.integers(1, 10), st.integers(1, 4), st.integers(1, 3), st.integers(0, 5))
def test_ranks_in_lockstep_take_what_one_process_takes_with_the_global_batch(per_rank, world, batch, seed):
    """W ranks taking B items each per step see exactly the items (and keys) one process taking
    W*B sees, epoch after epoch: the basis of N-process == 1-process training."""
    length = per_rank * world
    if per_rank < batch:
        with pytest.raises(ValueError, match="cannot give"):
            take(Cursor(), batch, length, seed, 0, world)
        return
    cursors, single = [Cursor()] * world, Cursor()
    for _ in range(7):
        taken = []
        for rank in range(world):
            items, cursors[rank] = take(cursors[rank], batch, length, seed, rank, world)
            taken += items
        expected, single = take(single, world * batch, length, seed, 0, 1)
        assert sorted(taken, key=lambda i: i.position) == sorted(expected, key=lambda i: i.position)


@given(st.integers(1, 3), st.sampled_from([(1, 2), (2, 1), (2, 4), (4, 2), (1, 3), (3, 1)]), st.integers(0, 9),
       st.integers(0, 6), st.integers(0, 3))
def test_the_global_cursor_takes_the_same_samples_on_any_world_size(per_rank, worlds, extra, steps_before, seed):
    """k steps on W ranks, then more on W' ranks (the same global batch G), take exactly the items
    and keys one process taking G per step takes: what resuming on another world size relies on."""
    before, after = worlds
    global_batch = per_rank * before
    if global_batch % after:
        return
    length = global_batch + extra

    def steps(world, cursor, count):
        taken = []
        for _ in range(count):
            step = []
            for rank in range(world):
                items, moved = take(cursor, global_batch // world, length, seed, rank, world)
                step += items
            cursor = moved  # the same on every rank
            taken.append(sorted((i.epoch, i.position, i.index) for i in step))
        return taken, cursor

    switched, cursor = steps(before, Cursor(), steps_before)
    more, _ = steps(after, cursor, 5)
    alone, _ = steps(1, Cursor(), steps_before + 5)
    assert switched + more == alone


def test_cursor_moves_to_the_next_epoch_when_the_shard_runs_out():
    cursor, seen = Cursor(), []
    for _ in range(5):
        items, cursor = take(cursor, 2, 5, seed=3, rank=0, world_size=1)
        seen.append([(i.epoch, i.index) for i in items])
    assert [e for batch in seen for e, _ in batch] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    first_epoch = {i for batch in seen[:2] for e, i in batch}
    assert len(first_epoch) == 4  # 5 items, batches of 2: the fifth waits for a later epoch


def test_sample_noise_depends_only_on_its_key():
    a = noise_and_timesteps((4, 2, 2), [sample_generator(0, 1, 5, 0), sample_generator(0, 1, 6, 0)], 1000)
    b = noise_and_timesteps((4, 2, 2), [sample_generator(0, 1, 6, 0)], 1000)
    assert torch.equal(a[0][1:], b[0]) and torch.equal(a[1][1:], b[1])
    c = noise_and_timesteps((4, 2, 2), [sample_generator(0, 1, 6, 1)], 1000)
    assert not torch.equal(b[0], c[0])
