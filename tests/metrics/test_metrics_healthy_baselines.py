"""Healthy-set baselines: the nearest healthy training image and the mean healthy image."""

import pytest
import torch

from meddiff.errors import ConfigError, DataError
from meddiff.metrics.baselines import MeanHealthy, NearestHealthy, reference_subset


def _ref(n=60, c=1, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, s, s, generator=g) * 2 - 1


def test_nn_finds_the_exact_neighbour_and_matches_brute_force():
    ref = _ref()
    g = torch.Generator().manual_seed(1)
    query = ref[[17, 3, 42]] + 0.01 * torch.randn(3, 1, 8, 8, generator=g)
    nn = NearestHealthy(ref, chunk_size=7)  # several chunks, the neighbours in different ones
    idx, dist = nn.search(query)
    assert idx.tolist() == [17, 3, 42]
    brute = torch.cdist(query.reshape(3, -1), ref.reshape(60, -1)).pow(2)
    assert torch.allclose(dist, brute.min(dim=1).values, atol=1e-4)
    assert torch.equal(nn.reconstruct(query), ref[[17, 3, 42]])
    m = nn.map(query)
    assert m.shape == query.shape and torch.allclose(m, (query - ref[[17, 3, 42]]).abs())
    # a reference image is its own neighbour with distance ~0 (float32 expansion |x|^2 - 2xy + |y|^2)
    idx, dist = NearestHealthy(ref, chunk_size=1000).search(ref[:10])
    assert idx.tolist() == list(range(10)) and (dist < 1e-4).all()


def test_nn_distance_inside_the_brain_mask_only():
    ref = _ref()
    query = ref[[9]].clone()
    query[..., :2] = ref[[5]][..., :2]  # image 5 inside the mask (2 left columns), image 9 outside it
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., :2] = True
    nn = NearestHealthy(ref, chunk_size=16)
    assert nn.search(query, mask)[0].item() == 5
    assert nn.search(query)[0].item() == 9  # without the mask the outside decides
    m = nn.map(query, mask)
    assert (m == 0).all()  # zero inside (exact match) and outside (masked)
    assert (nn.map(query)[..., :2] > 0).any()


def test_nn_cost_is_recorded():
    ref = _ref(n=30)
    nn = NearestHealthy.from_images(ref, max_items=20, seed=0)
    nn.map(ref[:4])
    c = nn.cost.as_dict()
    assert c["n_reference"] == 20 and c["n_healthy_total"] == 30 and c["n_queries"] == 4
    assert c["pixels_per_image"] == 64 and c["seconds"] >= c["query_seconds"] > 0
    assert "4 queries x 20 reference images of 30 healthy" in c["scanned"]


def test_reference_subset_is_deterministic():
    a = reference_subset(50_000, 10_000, seed=3)
    assert torch.equal(a, reference_subset(50_000, 10_000, seed=3))
    assert not torch.equal(a, reference_subset(50_000, 10_000, seed=4))
    assert a.numel() == 10_000 and a.unique().numel() == 10_000 and (a[1:] > a[:-1]).all()
    assert int(a.max()) < 50_000
    # a larger subset extends the smaller one (prefix of one seeded permutation)
    assert set(reference_subset(50_000, 100, seed=3).tolist()) <= set(reference_subset(50_000, 200, seed=3).tolist())
    assert torch.equal(reference_subset(7, 10_000), torch.arange(7))
    with pytest.raises(DataError, match="empty"):
        reference_subset(0)
    with pytest.raises(ConfigError, match="max_items"):
        reference_subset(10, 0)


class _Items:
    def __init__(self, images, labels):
        self.images, self.labels, self.calls = images, labels, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.calls += 1
        return {"image": self.images[i], "label": self.labels[i]}


def test_from_dataset_loads_only_the_subset_and_skips_anomalous():
    ref = _ref(n=40)
    labels = torch.zeros(40, dtype=torch.long)
    labels[reference_subset(40, 10, seed=0)[0]] = 1
    ds = _Items(ref, labels)
    nn = NearestHealthy.from_dataset(ds, max_items=10, seed=0)
    assert ds.calls == 10 and nn.cost.n_reference == 9 and nn.cost.n_healthy_total == 40
    again = NearestHealthy.from_dataset(_Items(ref, labels), max_items=10, seed=0)
    assert torch.equal(nn.reference, again.reference)


def test_mean_healthy_image():
    ref = _ref(n=20)
    mh = MeanHealthy.from_images(ref)
    x = _ref(n=3, seed=5)
    assert torch.allclose(mh.map(x), (x - ref.mean(0)).abs())
    mask = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:5, 2:5] = True
    mm = mh.map(x, mask)
    assert (mm[~mask.expand_as(mm)] == 0).all() and torch.equal(mm[mask.expand_as(mm)], mh.map(x)[mask.expand_as(mm)])
    # the streaming mean over a loader equals the plain mean; label-1 images are left out
    batches = [{"image": ref[:8], "label": torch.zeros(8)}, {"image": torch.cat([ref[8:], x]),
                                                             "label": torch.cat([torch.zeros(12), torch.ones(3)])}]
    ml = MeanHealthy.from_loader(batches)
    assert torch.allclose(ml.mean, ref.mean(0), atol=1e-6) and ml.cost.n_healthy_total == 20
    assert mh.cost.as_dict()["n_queries"] == 9  # three map() calls of 3 images
    with pytest.raises(DataError, match="do not match"):
        mh.map(torch.zeros(1, 1, 4, 4))
