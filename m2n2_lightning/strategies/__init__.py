"""Gradient-free strategies speaking the ask/tell protocol."""

from m2n2_lightning.strategies.base import Strategy
from m2n2_lightning.strategies.cmaes import CMAESStrategy
from m2n2_lightning.strategies.m2n2 import M2N2Strategy
from m2n2_lightning.strategies.map_elites import MAPElitesStrategy

__all__ = ["CMAESStrategy", "M2N2Strategy", "MAPElitesStrategy", "Strategy"]
