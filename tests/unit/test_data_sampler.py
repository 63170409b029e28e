"""ResumableSampler: deterministic order, world-size-independent global batches, exact resume."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from lorafit.data.sampler import ResumableSampler
from lorafit.errors import UserError


def global_batches(n: int, world: int, micro: int, steps: int, *, state=None, **kw) -> list[list[int]]:
    """What `steps` steps of `world` ranks with `micro` samples each train on, step by step (sorted sets)."""
    samplers = [ResumableSampler(n, rank=r, world_size=world, **kw) for r in range(world)]
    if state is not None:
        for s in samplers:
            s.load_state_dict(state)
    streams = [s.forever() for s in samplers]
    out = []
    for _ in range(steps):
        out.append(sorted(i for stream in streams for i in islice(stream, micro)))
        for s in samplers:
            s.advance(micro * world)
    return out


def test_epoch_is_a_seeded_permutation():
    a = list(ResumableSampler(50, seed=3))
    assert sorted(a) == list(range(50)) and a != list(range(50))
    assert a == list(ResumableSampler(50, seed=3)) != list(ResumableSampler(50, seed=4))
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    s = ResumableSampler(50, seed=3)
    s.set_epoch(1)
    assert list(s) == expected
    assert list(ResumableSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_global_batches_do_not_depend_on_world_size(world):
    # 12 samples per optimizer step; 100 samples -> 8 steps per epoch (4 dropped), 20 steps cross 2 epoch ends
    kw = dict(seed=7, global_batch_size=12)
    one = global_batches(100, 1, 12, 20, **kw)
    assert global_batches(100, world, 12 // world, 20, **kw) == one
    # gradient accumulation: 2 micro steps of 6 on one process cover the same samples per optimizer step
    accum = global_batches(100, 1, 6, 40, **kw)
    assert [sorted(accum[2 * k] + accum[2 * k + 1]) for k in range(20)] == one
    # every epoch is 8 steps of distinct samples
    assert all(len({i for batch in one[e * 8 : (e + 1) * 8] for i in batch}) == 96 for e in range(2))


def test_ranks_split_an_epoch_without_overlap():
    ranks = [list(ResumableSampler(10, rank=r, world_size=3, seed=1)) for r in range(3)]
    assert [len(r) for r in ranks] == [3, 3, 3]  # drop_last: 9 of 10, equal per rank
    assert len({i for r in ranks for i in r}) == 9
    padded = [list(ResumableSampler(10, rank=r, world_size=3, seed=1, drop_last=False)) for r in range(3)]
    assert [len(r) for r in padded] == [4, 4, 4] and {i for r in padded for i in r} == set(range(10))


def test_resume_continues_exactly_where_it_stopped():
    kw = dict(seed=11, global_batch_size=8)
    straight = global_batches(30, 2, 4, 12, **kw)
    first = ResumableSampler(30, rank=0, world_size=2, **kw)
    for _ in range(5):
        first.advance(8)
    state = first.state_dict()
    assert (state["epoch"], state["consumed"]) == (1, 16)  # 24 samples per epoch
    assert global_batches(30, 2, 4, 7, state=state, **kw) == straight[5:]
    # and on a different world size: the same global batches
    assert global_batches(30, 4, 2, 7, state=state, **kw) == straight[5:]
    assert global_batches(30, 1, 8, 7, state=state, **kw) == straight[5:]


def test_iteration_does_not_move_the_state_only_advance_does():
    s = ResumableSampler(20, seed=0)
    everything = list(s)
    assert list(s) == everything and len(s) == 20
    s.advance(5)
    assert list(s) == everything[5:] and len(s) == 15
    s.advance(15)
    assert (s.epoch, s.consumed, s.global_position) == (1, 0, 20)
    s.advance(45)  # excess carries over into later epochs, as in the forever() stream
    assert (s.epoch, s.consumed) == (3, 5)


def test_dataloader_resumes_mid_epoch():
    data = torch.arange(40)
    s = ResumableSampler(40, seed=5)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=s)
    seen = []
    for batch in islice(loader, 3):
        seen += batch.tolist()
        s.advance(len(batch))
    resumed = ResumableSampler(40, seed=5)
    resumed.load_state_dict(s.state_dict())
    rest = [i for b in torch.utils.data.DataLoader(data, batch_size=4, sampler=resumed) for i in b.tolist()]
    assert seen + rest == list(ResumableSampler(40, seed=5))


def test_refuses_bad_states_and_arguments():
    s = ResumableSampler(30, world_size=2, seed=1)
    with pytest.raises(UserError, match=r"sampler had dataset_len=31, this run has 30"):
        s.load_state_dict({"epoch": 0, "consumed": 0, "dataset_len": 31, "seed": 1})
    with pytest.raises(UserError, match=r"sampler had seed=2"):
        s.load_state_dict({"epoch": 0, "consumed": 0, "dataset_len": 30, "seed": 2})
    with pytest.raises(UserError, match=r"3 samples consumed in the epoch is not a position of world size 2"):
        s.load_state_dict({"epoch": 0, "consumed": 3})
    with pytest.raises(ValueError, match="multiple of world_size 2"):
        s.advance(3)
    with pytest.raises(ValueError, match="not a multiple of world_size"):
        ResumableSampler(30, world_size=4, global_batch_size=6)
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        ResumableSampler(30, rank=2, world_size=2)
    with pytest.raises(UserError, match=r"the dataset has 5 samples, fewer than one global batch \(8\)"):
        ResumableSampler(5, global_batch_size=8)
