"""BucketBatchSampler: bucket-pure batches, an order fixed by (seed, epoch), resume by skipping, DDP sharding."""

from collections import Counter

import pytest

from trainers.data.sampler import BucketBatchSampler

BUCKETS = [(512, 512), (640, 384), (384, 640)]


class FakeDataset:
    """Only what the sampler reads: a length and each index's bucket (sizes 7, 5 and 3 per bucket)."""

    def __init__(self, counts=(7, 5, 3)):
        self.buckets = [bucket for bucket, count in zip(BUCKETS, counts) for _ in range(count)]

    def __len__(self):
        return len(self.buckets)

    def bucket_of(self, index):
        return self.buckets[index]


def test_batches_never_mix_buckets_and_cover_every_index_once():
    data = FakeDataset()
    sampler = BucketBatchSampler(data, 2, seed=0)
    batches = sampler.batches_for_epoch(0)
    assert all(len({data.bucket_of(i) for i in batch}) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(len(data)))
    assert len(sampler) == len(batches) == 4 + 3 + 2
    assert sorted(len(batch) for batch in batches) == [1, 1, 1, 2, 2, 2, 2, 2, 2]


def test_order_is_deterministic_per_epoch_and_differs_across_epochs():
    data = FakeDataset()
    first, again = BucketBatchSampler(data, 2, seed=3), BucketBatchSampler(data, 2, seed=3)
    assert first.batches_for_epoch(4) == again.batches_for_epoch(4)
    epochs = [first.batches_for_epoch(epoch) for epoch in range(5)]
    assert len({str(batches) for batches in epochs}) == 5
    assert first.batches_for_epoch(0) != BucketBatchSampler(data, 2, seed=4).batches_for_epoch(0)


def test_resume_from_batch_k_gives_the_remaining_batches():
    data = FakeDataset()
    full = BucketBatchSampler(data, 3, seed=1).batches_for_epoch(2)
    resumed = BucketBatchSampler(data, 3, seed=1).batches_for_epoch(2)[4:]  # a fresh process after 4 batches
    assert resumed == full[4:] and len(resumed) == len(full) - 4


def test_iteration_follows_set_epoch():
    sampler = BucketBatchSampler(FakeDataset(), 2, seed=0)
    sampler.set_epoch(3)
    assert list(sampler) == sampler.batches_for_epoch(3)


@pytest.mark.parametrize("counts, replicas", [((8, 4, 4), 2), ((6, 4, 2), 3)])
def test_ddp_ranks_split_the_batches_exactly_once_when_they_divide(counts, replicas):
    data = FakeDataset(counts)
    everything = BucketBatchSampler(data, 2, seed=9).batches_for_epoch(1)
    ranks = [BucketBatchSampler(data, 2, seed=9, num_replicas=replicas, rank=r) for r in range(replicas)]
    shards = [rank.batches_for_epoch(1) for rank in ranks]
    assert all(len(shard) == len(ranks[0]) == len(everything) // replicas for shard in shards)
    assert sorted(map(tuple, (b for shard in shards for b in shard))) == sorted(map(tuple, everything))


def test_ddp_pads_by_repeating_so_every_rank_steps_equally():
    data = FakeDataset((7, 5, 3))  # 9 batches of 2 over 4 ranks → 12 slots, 3 repeated
    everything = BucketBatchSampler(data, 2, seed=0).batches_for_epoch(0)
    shards = [BucketBatchSampler(data, 2, seed=0, num_replicas=4, rank=r).batches_for_epoch(0) for r in range(4)]
    assert [len(shard) for shard in shards] == [3, 3, 3, 3]
    seen = Counter(tuple(b) for shard in shards for b in shard)
    assert set(seen) == set(map(tuple, everything))
    assert sorted(seen.values()) == [1] * 6 + [2] * 3
    assert [b for b, n in seen.items() if n == 2] == [tuple(b) for b in everything[:3]]


def test_more_ranks_than_batches_still_gives_each_rank_one():
    data = FakeDataset((1, 0, 0))
    shards = [BucketBatchSampler(data, 4, seed=0, num_replicas=3, rank=r).batches_for_epoch(0) for r in range(3)]
    assert shards == [[[0]], [[0]], [[0]]]


def test_bad_arguments():
    with pytest.raises(ValueError):
        BucketBatchSampler(FakeDataset(), 0, seed=0)
    with pytest.raises(ValueError):
        BucketBatchSampler(FakeDataset(), 1, seed=0, num_replicas=2, rank=2)
