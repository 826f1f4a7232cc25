"""TF-style sampler: proportions, per-epoch redraw, determinism, DDP shards, fixed eval draw."""

import numpy as np
import pytest

from kws_lightning.data.sampler import (
    SILENCE_ITEM,
    TFStyleSampler,
    composition_sizes,
    fixed_selection,
)

KNOWN = np.arange(800)
UNKNOWN = np.arange(800, 1400)


def test_composition_sizes_follow_the_seed_formula():
    # silence_num = known / (1 - ps - pu) * ps
    assert composition_sizes(800, 0.1, 0.1) == (100, 100)
    assert composition_sizes(1000, 0.2, 0.1) == (286, 143)
    assert composition_sizes(800, 0.0, 0.0) == (0, 0)
    with pytest.raises(ValueError, match="no room"):
        composition_sizes(10, 0.6, 0.5)


def test_epoch_proportions_and_every_known_clip_once():
    sampler = TFStyleSampler(KNOWN, UNKNOWN, 0.1, 0.1, seed=3)
    items = np.array(list(sampler))
    assert len(items) == len(sampler) == 1000
    assert (items == SILENCE_ITEM).mean() == pytest.approx(0.1)
    assert np.isin(items, UNKNOWN).mean() == pytest.approx(0.1)
    known = items[np.isin(items, KNOWN)]
    assert sorted(known.tolist()) == KNOWN.tolist()
    assert len(set(items[np.isin(items, UNKNOWN)])) == 100  # no repeats while the pool is large enough


def test_unknown_and_order_redrawn_each_epoch_reproducibly():
    sampler = TFStyleSampler(KNOWN, UNKNOWN, 0.1, 0.1, seed=3)
    first = np.array(list(sampler))
    sampler.set_epoch(1)
    second = np.array(list(sampler))
    assert set(first[np.isin(first, UNKNOWN)]) != set(second[np.isin(second, UNKNOWN)])
    assert not np.array_equal(first, second)
    replay = TFStyleSampler(KNOWN, UNKNOWN, 0.1, 0.1, seed=3)
    replay.set_epoch(1)
    np.testing.assert_array_equal(np.array(list(replay)), second)
    other_seed = TFStyleSampler(KNOWN, UNKNOWN, 0.1, 0.1, seed=4)
    other_seed.set_epoch(1)
    assert not np.array_equal(np.array(list(other_seed)), second)


def test_small_unknown_pool_cycles_through_all_before_repeating():
    sampler = TFStyleSampler(KNOWN, np.arange(900, 930), 0.1, 0.1)
    unknown = np.array([i for i in sampler if i >= 900])
    assert len(unknown) == 100
    counts = np.bincount(unknown - 900)
    assert counts.min() >= 3 and counts.max() <= 4


def test_ddp_shards_are_disjoint_and_cover_the_epoch():
    full = TFStyleSampler(KNOWN, UNKNOWN, seed=1)
    full.set_epoch(2)
    shards = []
    for rank in range(3):
        sampler = TFStyleSampler(KNOWN, UNKNOWN, seed=1, num_replicas=3, rank=rank)
        sampler.set_epoch(2)
        shards.append(list(sampler))
    assert {len(s) for s in shards} == {334}
    positions = np.concatenate([np.arange(r, 1002, 3) for r in range(3)])
    np.testing.assert_array_equal(np.concatenate(shards), np.resize(full.epoch_items(), 1002)[positions])
    with pytest.raises(ValueError, match="rank"):
        TFStyleSampler(KNOWN, UNKNOWN, num_replicas=2, rank=2)


def test_fixed_selection_is_stable_with_same_proportions():
    a = fixed_selection(KNOWN, UNKNOWN, 0.1, 0.1, seed=0)
    b = fixed_selection(KNOWN, UNKNOWN, 0.1, 0.1, seed=0)
    np.testing.assert_array_equal(a, b)
    assert (a == SILENCE_ITEM).sum() == 100 and np.isin(a, UNKNOWN).sum() == 100
    with pytest.raises(ValueError, match="unknown class is empty"):
        fixed_selection(KNOWN, np.array([], np.int64), 0.1, 0.1, seed=0)


def test_balanced_keywords_equalise_classes_and_keep_every_clip():
    known = np.arange(130)
    targets = np.array([2] * 100 + [3] * 30)  # a frequent and a scarce keyword
    sampler = TFStyleSampler(known, UNKNOWN, 0.1, 0.1, seed=0, known_targets=targets, balance_keywords=True)
    items = np.array(list(sampler))
    assert len(items) == len(sampler) == 250  # 2 x 100 keywords, then 10 % silence and unknown each
    scarce = items[(items >= 100) & (items < 130)]
    assert len(scarce) == 100 and set(scarce) == set(range(100, 130))
    assert np.bincount(scarce - 100).max() <= 4  # cycled, not sampled with replacement
    frequent = items[(items >= 0) & (items < 100)]
    assert sorted(frequent.tolist()) == list(range(100))
    assert (items == SILENCE_ITEM).sum() == 25 and np.isin(items, UNKNOWN).sum() == 25
    plain = TFStyleSampler(known, UNKNOWN, 0.1, 0.1, seed=0, known_targets=targets)
    assert len(plain) == 162  # balancing is opt-in: 130 + 2 x round(130 / 0.8 * 0.1)
    with pytest.raises(ValueError, match="known_targets"):
        TFStyleSampler(known, UNKNOWN, balance_keywords=True)
