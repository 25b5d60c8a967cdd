"""LightningModules: thin subclasses of ``DiffusionModule`` that differ only where the method differs.

``DiffusionModule`` (``base``) holds what every diffusion model shares (loss, EMA, ``model.sampling``); the anomaly
families hold the one anomaly-validation component (``validation.AnomalyValidation``); the refiner loads its frozen
first stage with ``frozen``.
"""

from meddiff.models.base import DiffusionModule
from meddiff.models.coarse_gan import CoarseGenerator
from meddiff.models.conditional import ConditionalDiffusion
from meddiff.models.guided import GuidedDiffusion
from meddiff.models.refiner import RefinerDiffusion
from meddiff.models.unconditional import UnconditionalDiffusion

__all__ = [
    "CoarseGenerator",
    "ConditionalDiffusion",
    "DiffusionModule",
    "GuidedDiffusion",
    "RefinerDiffusion",
    "UnconditionalDiffusion",
]
