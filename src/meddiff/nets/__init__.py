"""Denoiser backbones; ``build_net`` is the single factory configs go through."""

from meddiff.nets.factory import build_net
from meddiff.nets.gan import BrainomalyGenerator, PatchCritic
from meddiff.nets.unets import DiffusersUNet, MonaiUNet, count_parameters

__all__ = ["BrainomalyGenerator", "DiffusersUNet", "PatchCritic", "MonaiUNet", "build_net", "count_parameters"]
