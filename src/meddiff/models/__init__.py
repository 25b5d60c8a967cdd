"""LightningModules: thin subclasses of ``DiffusionModule`` that differ only where the method differs."""

from meddiff.models.base import DiffusionModule
from meddiff.models.guided import GuidedDiffusion
from meddiff.models.unconditional import UnconditionalDiffusion

__all__ = ["DiffusionModule", "GuidedDiffusion", "UnconditionalDiffusion"]
