"""core/training/batches.py: shuffled batches, seeded per epoch, addressed by position."""

from __future__ import annotations

import pytest
import torch

from warmup_distill_kedro.core.training.batches import ShuffledBatches, batch_weight


def _ints(examples):
    return {"x": torch.tensor(examples)}


def test_shuffled_batches_deterministic_and_cover_each_epoch():
    examples = list(range(12))
    a = ShuffledBatches(examples, batch_size=4, collate_fn=_ints, seed=7)
    b = ShuffledBatches(examples, batch_size=4, collate_fn=_ints, seed=7)
    assert a.batches_per_epoch == 3
    epochs = []
    for epoch in range(3):
        seen = []
        for index in range(3):
            position = epoch * 3 + index
            batch = a.batch(position)["x"]
            assert batch.shape == (4,)
            assert torch.equal(batch, b.batch(position)["x"])
            seen.extend(batch.tolist())
        assert sorted(seen) == examples  # every example exactly once per epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    # Random access gives the same batch as sequential access.
    assert torch.equal(a.batch(1)["x"], ShuffledBatches(examples, 4, _ints, seed=7).batch(1)["x"])
    other_seed = [ShuffledBatches(examples, 4, _ints, seed=8).batch(p)["x"].tolist() for p in range(3)]
    assert sum(other_seed, []) != epochs[0]


def test_shuffled_batches_drop_tail_and_clamp():
    ragged = ShuffledBatches(list(range(10)), batch_size=4, collate_fn=_ints, seed=0)
    assert ragged.batches_per_epoch == 2
    for position in range(6):
        batch = ragged.batch(position)["x"].tolist()
        assert len(batch) == 4 and len(set(batch)) == 4
    small = ShuffledBatches([1, 2, 3], batch_size=8, collate_fn=_ints, seed=0)
    assert sorted(small.batch(0)["x"].tolist()) == [1, 2, 3]
    with pytest.raises(ValueError, match="empty"):
        ShuffledBatches([], batch_size=2, collate_fn=_ints, seed=0)


def test_a_batch_weighs_by_its_response_tokens_or_its_rows():
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])  # position t predicts t + 1
    assert batch_weight({"input_ids": labels.clamp(min=0), "labels": labels}) == 4
    pairs = {"chosen_input_ids": torch.zeros(3, 5, dtype=torch.long), "reference_chosen_logp": torch.zeros(3)}
    assert batch_weight(pairs) == 3
