"""The training loader: each epoch's order from (seed, epoch); a restored state continues mid-epoch."""

from __future__ import annotations

import torch
from lightning.fabric.utilities.types import _Stateful
from torch.utils.data import TensorDataset

from meddiff.data.resumable import ResumableLoader


def _epoch(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [b[0].tolist() for b in loader]


def test_order_depends_on_seed_and_epoch_only():
    ds = TensorDataset(torch.arange(10))
    a, b = ResumableLoader(ds, batch_size=3, seed=5), ResumableLoader(ds, batch_size=3, seed=5)
    _epoch(a, 0)
    assert _epoch(a, 1) == _epoch(b, 1)  # b never saw epoch 0
    assert _epoch(a, 1) != _epoch(a, 2)
    assert sorted(sum(_epoch(a, 3), [])) == list(range(10))
    assert isinstance(a, _Stateful)


def test_a_restored_state_continues_with_the_remaining_batches():
    ds = TensorDataset(torch.arange(10))
    a = ResumableLoader(ds, batch_size=3, seed=5)
    full = _epoch(a, 2)
    a.sampler.set_epoch(2)
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    assert state["epoch"] == 2 and state["batches_done"] == 2

    b = ResumableLoader(ds, batch_size=3, seed=999)  # the seed comes from the state
    b.load_state_dict(state)
    assert [x[0].tolist() for x in b] == full[2:]
    # a state saved at the end of an epoch starts the next epoch from its beginning
    c = ResumableLoader(ds, batch_size=3, seed=1)
    c.load_state_dict({**state, "batches_done": 4})
    assert [x[0].tolist() for x in c] == _epoch(ResumableLoader(ds, batch_size=3, seed=5), 3)


def test_iterating_does_not_touch_the_global_rng():
    ds = TensorDataset(torch.arange(10))
    loader = ResumableLoader(ds, batch_size=3, seed=5)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    _epoch(loader, 0)
    assert torch.equal(torch.rand(1), expected)
