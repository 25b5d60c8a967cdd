"""LightningModules: thin subclasses of ``DiffusionModule`` that differ only where the method differs.

``DiffusionModule`` (``base``) holds what every diffusion model shares; the models that score anomalies add
``AnomalyScoring`` / ``PartialDiffusionReconstruction`` (``anomaly``).
"""

from meddiff.models.anomaly import AnomalyScoring, PartialDiffusionReconstruction
from meddiff.models.base import DiffusionModule
from meddiff.models.conditional import ConditionalDiffusion
from meddiff.models.guided import GuidedDiffusion
from meddiff.models.unconditional import UnconditionalDiffusion

__all__ = [
    "AnomalyScoring",
    "ConditionalDiffusion",
    "DiffusionModule",
    "GuidedDiffusion",
    "PartialDiffusionReconstruction",
    "UnconditionalDiffusion",
]
