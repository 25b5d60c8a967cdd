"""Deprecated: moved to meddiff.protocols.denoise_baseline; kept for one release."""

from meddiff.protocols.denoise_baseline import (
    SUPERVISED_LOSSES,
    SupervisedDenoiser,
    build_supervised_net,
    cache_key,
    load_or_train_supervised,
    train_supervised,
)

__all__ = [
    "SUPERVISED_LOSSES",
    "SupervisedDenoiser",
    "build_supervised_net",
    "cache_key",
    "load_or_train_supervised",
    "train_supervised",
]
