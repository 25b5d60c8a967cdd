"""Trivial baselines reported beside every model (DESIGN: "a trivial baseline is always reported").

- Image level: the mean intensity of the image (inside the brain mask if given). Bright lesions (e.g. acute
  hemorrhage in a brain window, FLAIR hyperintensities) raise it, so a model that does not beat it has learnt
  nothing beyond brightness.
- Pixel level: the intensity itself as the anomaly map, rescaled from ``[-1, 1]`` to ``[0, 1]``; thresholding
  it is the literature's "intensity thresholding" baseline for hyperintense lesions.
- The mean healthy image (``MeanHealthy``): ``|x - mean of the healthy training images|``.
- The nearest healthy training image (``NearestHealthy``): ``|x - NN(x)|`` with ``NN`` the pixel-space L2
  neighbour among the healthy training images (a fixed seeded subset of <= 10,000 for large sets). On
  MNIST-splotch it scores image AUROC ~0.95 with no training: a model must beat this lookup table.

Both healthy-set baselines give a reconstruction (``reconstruct``) and a map (``map``) so the caller can run them
through the same post-processing chosen on validation, and record their cost (``.cost``: seconds and what was
scanned) for the report.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from meddiff.errors import ConfigError, DataError


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DataError(f"images must be a [B, C, H, W] tensor in [-1, 1]; got {shape}.")


def _as_region(
    mask: torch.Tensor | None, x: torch.Tensor, dtype: torch.dtype = torch.float32, name: str = "brain_mask"
) -> torch.Tensor | None:
    """``mask`` (bool or 0/1, ``[B, 1 or C, H, W]``) as a 0/1 ``[B, C, H, W]`` tensor of ``dtype`` on ``x``'s device;
    None stays None. ``DataError`` naming ``name`` when its shape does not fit ``x``."""
    if mask is None:
        return None
    if (
        not isinstance(mask, torch.Tensor)
        or mask.ndim != 4
        or mask.shape[0] != x.shape[0]
        or mask.shape[2:] != x.shape[2:]
        or mask.shape[1] not in (1, x.shape[1])
    ):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise DataError(f"{name} shape {shape} does not fit images shape {tuple(x.shape)}; use [B, 1, H, W].")
    m = mask if mask.dtype == torch.bool else mask != 0
    return m.to(x.device).expand_as(x).to(dtype)


def mean_intensity_score(
    images: torch.Tensor, mask: torch.Tensor | None = None, empty_value: float = -1.0
) -> torch.Tensor:
    """Mean intensity per image over channels and the pixels inside ``mask``.

    Args:
        images: ``[B, C, H, W]`` in ``[-1, 1]``.
        mask: optional bool ``[B, 1, H, W]`` or ``[B, C, H, W]`` region (e.g. the brain mask).
        empty_value: score of an image whose mask is empty; -1.0 (black, the least anomalous score, as
            ``meddiff.anomaly.reduce_map`` gives such images its lowest score 0) so metrics stay defined;
            pass ``float("nan")`` to spot and drop them instead.

    Returns:
        ``[B]`` float scores in ``[-1, 1]``.
    """
    _check_images(images)
    x = images.float() if not images.is_floating_point() else images
    m = _as_region(mask, x, dtype=x.dtype, name="mask")
    if m is None:
        return x.mean(dim=(1, 2, 3))
    count = m.sum(dim=(1, 2, 3))
    mean = (x * m).sum(dim=(1, 2, 3)) / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.full_like(mean, float(empty_value)))


def intensity_map(images: torch.Tensor) -> torch.Tensor:
    """Pixel baseline map: channel-mean intensity mapped from ``[-1, 1]`` to ``[0, 1]`` (clamped).

    Args:
        images: ``[B, C, H, W]`` in ``[-1, 1]``.

    Returns:
        ``[B, 1, H, W]`` float in ``[0, 1]`` (brighter = more anomalous).
    """
    _check_images(images)
    x = images.float() if not images.is_floating_point() else images
    return ((x.mean(dim=1, keepdim=True) + 1.0) * 0.5).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Baselines that use the healthy training set: the mean healthy image and the nearest healthy training image.
# ----------------------------------------------------------------------------------------------------------------

MAX_REFERENCE = 10_000


def reference_subset(n: int, max_items: int = MAX_REFERENCE, seed: int = 0) -> torch.Tensor:
    """Indices of the fixed random subset of ``range(n)`` a baseline scans: all when ``n <= max_items``.

    The subset is the first ``max_items`` of a seeded ``torch.randperm`` (CPU generator), sorted: the same ``n``,
    ``max_items`` and ``seed`` give the same subset on any machine, and a larger ``max_items`` extends it.

    Returns:
        ``[min(n, max_items)]`` int64, ascending.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DataError(f"the healthy reference set is empty (n={n!r}); the baseline needs healthy training images.")
    if not isinstance(max_items, int) or isinstance(max_items, bool) or max_items < 1:
        raise ConfigError(f"max_items={max_items!r} must be a positive integer (default {MAX_REFERENCE}).")
    if n <= max_items:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:max_items].sort().values


def _load_items(dataset: Any, indices: torch.Tensor, image_key: str) -> tuple[torch.Tensor, int]:
    """Stack ``dataset[i][image_key]`` for ``indices``; items with a non-zero ``label`` are skipped (returned count)."""
    images, dropped = [], 0
    for i in indices.tolist():
        item = dataset[i]
        img = item[image_key] if isinstance(item, Mapping) else item
        label = item.get("label") if isinstance(item, Mapping) else None
        if label is not None and int(torch.as_tensor(label).reshape(-1)[0]) != 0:
            dropped += 1
            continue
        images.append(torch.as_tensor(img).float())
    if not images:
        raise DataError(f"no healthy (label 0) item among the {indices.numel()} reference items of the dataset.")
    return torch.stack(images), dropped


@dataclass
class BaselineCost:
    """What a baseline cost: wall seconds (building its reference + answering queries) and what it scanned."""

    name: str
    fit_seconds: float = 0.0
    query_seconds: float = 0.0
    n_reference: int = 0  # reference images each query is compared with
    n_healthy_total: int = 0  # healthy training images available (the reference is a subset when larger)
    n_queries: int = 0
    pixels_per_image: int = 0

    @property
    def seconds(self) -> float:
        return self.fit_seconds + self.query_seconds

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = self.seconds
        d["scanned"] = (
            f"{self.n_queries} queries x {self.n_reference} reference images of {self.n_healthy_total} healthy "
            f"({self.pixels_per_image} values each)"
        )
        return d


class MeanHealthy:
    """The mean healthy image ``mu`` (pixel-wise mean of the healthy training images) as a reconstruction.

    ``map(x) = |x - mu|`` (zero outside the brain mask when one is given); ``reconstruct(x)`` returns ``mu``
    repeated, so the caller can run it through the same scorer / post-processing as a model's reconstruction.
    """

    def __init__(self, mean_image: torch.Tensor, n_images: int, fit_seconds: float = 0.0) -> None:
        if not isinstance(mean_image, torch.Tensor) or mean_image.ndim != 3:
            raise DataError(f"mean_image must be [C, H, W]; got {getattr(mean_image, 'shape', type(mean_image))}.")
        self.mean = mean_image.float()
        self.cost = BaselineCost(
            "mean_healthy_image", fit_seconds=fit_seconds, n_reference=1, n_healthy_total=int(n_images),
            pixels_per_image=int(self.mean.numel()),
        )

    @classmethod
    def from_images(cls, images: torch.Tensor) -> MeanHealthy:
        """From healthy training images ``[N, C, H, W]`` in ``[-1, 1]``."""
        _check_images(images)
        t0 = time.perf_counter()
        mean = images.float().mean(dim=0)
        return cls(mean, images.shape[0], time.perf_counter() - t0)

    @classmethod
    def from_loader(cls, loader: Iterable, image_key: str = "image") -> MeanHealthy:
        """Streaming mean over every batch (``dict`` with ``image_key`` ``[B, C, H, W]``, or a tensor).

        Batches carrying ``label`` keep only label-0 images.
        """
        t0 = time.perf_counter()
        total: torch.Tensor | None = None
        n = 0
        for batch in loader:
            x = batch[image_key] if isinstance(batch, Mapping) else batch
            _check_images(x)
            x = x.double()
            if isinstance(batch, Mapping) and batch.get("label") is not None:
                x = x[torch.as_tensor(batch["label"]).reshape(-1).to(x.device) == 0]
            s = x.sum(dim=0).cpu()
            total = s if total is None else total + s
            n += x.shape[0]
        if total is None or n == 0:
            raise DataError("the healthy training loader yielded no healthy images; the mean healthy image needs some.")
        return cls((total / n).float(), n, time.perf_counter() - t0)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``mu`` as ``[B, C, H, W]`` on ``x``'s device (counted as ``B`` queries in ``cost``).

        Pass it as the "reconstruction" to ``meddiff.anomaly.scoring.score_batch`` to score the baseline with the
        post-processing chosen on validation.
        """
        _check_images(x)
        if x.shape[1:] != self.mean.shape:
            raise DataError(f"images {tuple(x.shape)} do not match the mean healthy image {tuple(self.mean.shape)}.")
        t0 = time.perf_counter()
        out = self.mean.to(x.device).expand_as(x)
        self.cost.query_seconds += time.perf_counter() - t0
        self.cost.n_queries += x.shape[0]
        return out

    def map(self, x: torch.Tensor, brain_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``|x - mu|`` ``[B, C, H, W]`` in ``[0, 2]`` (zero outside ``brain_mask`` ``[B, 1, H, W]``)."""
        out = (x.float() - self.reconstruct(x)).abs()
        region = _as_region(brain_mask, out)
        return out if region is None else out * region


class NearestHealthy:
    """Nearest healthy training image in pixel space (squared L2, inside the query's brain mask if given).

    The reference is the healthy training set, or a fixed seeded random subset of at most ``max_items`` images of it
    (``reference_subset``). Distances are computed in torch as chunked matrix products of flattened images,
    ``|m*x|^2 - 2 (m*x) . y + m . y^2`` over reference chunks of ``chunk_size`` images (``m`` = the query's mask, all
    ones without one), in float32, so memory is ``[B, chunk_size]`` plus one chunk; ties go to the lower index.
    ``dtype=torch.float16`` halves the stored reference (a 10,000 x 128 x 128 set is 655 MB in float32).
    """

    def __init__(
        self,
        reference: torch.Tensor,
        n_healthy_total: int | None = None,
        chunk_size: int = 2048,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        fit_seconds: float = 0.0,
    ) -> None:
        _check_images(reference)
        if reference.shape[0] < 1:
            raise DataError("the healthy reference set is empty; the nearest-neighbour baseline needs images.")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigError(f"chunk_size={chunk_size!r} must be a positive integer (e.g. 2048).")
        t0 = time.perf_counter()
        self.shape = tuple(reference.shape[1:])
        dev = torch.device(device) if device is not None else reference.device
        self.reference = reference.reshape(reference.shape[0], -1).to(device=dev, dtype=dtype).contiguous()
        self.chunk_size = chunk_size
        n = int(reference.shape[0])
        self.cost = BaselineCost(
            "nearest_healthy_image", fit_seconds=fit_seconds + time.perf_counter() - t0, n_reference=n,
            n_healthy_total=int(n_healthy_total if n_healthy_total is not None else n),
            pixels_per_image=int(self.reference.shape[1]),
        )

    @classmethod
    def from_images(
        cls, images: torch.Tensor, max_items: int = MAX_REFERENCE, seed: int = 0, **kwargs: Any
    ) -> NearestHealthy:
        """From all healthy training images ``[N, C, H, W]``; keeps ``reference_subset(N, max_items, seed)``."""
        _check_images(images)
        t0 = time.perf_counter()
        idx = reference_subset(int(images.shape[0]), max_items, seed)
        return cls(images[idx], n_healthy_total=images.shape[0], fit_seconds=time.perf_counter() - t0, **kwargs)

    @classmethod
    def from_dataset(
        cls, dataset: Any, max_items: int = MAX_REFERENCE, seed: int = 0, image_key: str = "image", **kwargs: Any
    ) -> NearestHealthy:
        """From a map-style healthy training dataset (items ``{"image": [C, H, W], ...}``), e.g. ``loader.dataset``.

        Only the ``reference_subset(len(dataset), max_items, seed)`` items are loaded; items with a non-zero
        ``label`` among them are skipped.
        """
        t0 = time.perf_counter()
        idx = reference_subset(len(dataset), max_items, seed)
        images, _dropped = _load_items(dataset, idx, image_key)
        return cls(images, n_healthy_total=len(dataset), fit_seconds=time.perf_counter() - t0, **kwargs)

    def _check_query(self, x: torch.Tensor) -> None:
        _check_images(x)
        if tuple(x.shape[1:]) != self.shape:
            raise DataError(f"images {tuple(x.shape)} do not match the reference images {self.shape}.")

    @torch.no_grad()
    def search(self, x: torch.Tensor, brain_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest reference image of each query.

        Args:
            x: ``[B, C, H, W]`` in ``[-1, 1]``; brain_mask: optional bool ``[B, 1, H, W]`` (distance inside it only).

        Returns:
            ``(index [B] int64 into the reference, squared L2 distance [B] float32 >= 0)``.
        """
        self._check_query(x)
        t0 = time.perf_counter()
        dev = self.reference.device
        q = x.to(dev, torch.float32).reshape(x.shape[0], -1)
        region = _as_region(brain_mask, x.to(dev))
        m = None if region is None else region.reshape(x.shape[0], -1)
        qm = q if m is None else q * m
        q_sq = (qm * q).sum(dim=1, keepdim=True)  # |m*x|^2 (m is 0/1)
        best_d = torch.full((x.shape[0],), float("inf"), device=dev)
        best_i = torch.zeros(x.shape[0], dtype=torch.long, device=dev)
        for start in range(0, self.reference.shape[0], self.chunk_size):
            y = self.reference[start : start + self.chunk_size].float()
            y_sq = (y * y).sum(dim=1)[None, :] if m is None else m @ (y * y).T
            d = q_sq - 2.0 * (qm @ y.T) + y_sq
            dmin, imin = d.min(dim=1)
            better = dmin < best_d  # strict: ties keep the earlier (lower) index
            best_d = torch.where(better, dmin, best_d)
            best_i = torch.where(better, imin + start, best_i)
        self.cost.query_seconds += time.perf_counter() - t0
        self.cost.n_queries += x.shape[0]
        return best_i, best_d.clamp_min(0.0)

    def reconstruct(self, x: torch.Tensor, brain_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The nearest healthy training image of each query, ``[B, C, H, W]`` on ``x``'s device.

        Pass it as the "reconstruction" to ``meddiff.anomaly.scoring.score_batch`` to score the baseline with the
        post-processing chosen on validation (``brain_mask`` here restricts the neighbour search; give the region to
        ``score_batch`` as well).
        """
        idx, _ = self.search(x, brain_mask)
        return self.reference[idx].float().reshape(x.shape).to(x.device)

    def map(self, x: torch.Tensor, brain_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``|x - NN(x)|`` ``[B, C, H, W]`` in ``[0, 2]`` (zero outside ``brain_mask``)."""
        out = (x.float() - self.reconstruct(x, brain_mask)).abs()
        region = _as_region(brain_mask, out)
        return out if region is None else out * region
