"""Gradient-free strategies speaking the ask/tell protocol."""

from m2n2_lightning.strategies.base import Strategy
from m2n2_lightning.strategies.cmaes import CMAESStrategy
from m2n2_lightning.strategies.layerwise_simplex import LayerwiseSimplexStrategy
from m2n2_lightning.strategies.layerwise_slerp import LayerwiseSlerpStrategy
from m2n2_lightning.strategies.m2n2 import M2N2Strategy
from m2n2_lightning.strategies.map_elites import MAPElitesStrategy

__all__ = ["CMAESStrategy", "LayerwiseSimplexStrategy", "LayerwiseSlerpStrategy", "M2N2Strategy", "MAPElitesStrategy", "Strategy"]
