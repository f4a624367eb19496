"""Gradient-free strategies speaking the ask/tell protocol."""

from m2n2_lightning.strategies.base import Strategy
from m2n2_lightning.strategies.m2n2 import M2N2Strategy

__all__ = ["M2N2Strategy", "Strategy"]
