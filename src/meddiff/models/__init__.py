"""LightningModules: thin subclasses of ``DiffusionModule`` that differ only where the method differs."""

from meddiff.models.base import DiffusionModule
from meddiff.models.conditional import ConditionalDiffusion
from meddiff.models.guided import GuidedDiffusion
from meddiff.models.unconditional import UnconditionalDiffusion

__all__ = ["ConditionalDiffusion", "DiffusionModule", "GuidedDiffusion", "UnconditionalDiffusion"]
