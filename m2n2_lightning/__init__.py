"""m2n2-lightning: gradient-free training and merging with M2N2 in PyTorch Lightning."""

from m2n2_lightning.callback import M2N2Callback
from m2n2_lightning.evaluator import Evaluator
from m2n2_lightning.models import MLP
from m2n2_lightning.module import EvolutionModule
from m2n2_lightning.optimizer import EvolutionOptimizer
from m2n2_lightning.params import FlatParams, NotVmappableError, population_forward
from m2n2_lightning.strategies import (
    CMAESStrategy,
    LayerwiseSimplexStrategy,
    LayerwiseSlerpStrategy,
    M2N2Strategy,
    MAPElitesStrategy,
    Strategy,
)

__all__ = [
    "MLP",
    "CMAESStrategy",
    "Evaluator",
    "EvolutionModule",
    "EvolutionOptimizer",
    "FlatParams",
    "LayerwiseSimplexStrategy",
    "LayerwiseSlerpStrategy",
    "M2N2Callback",
    "M2N2Strategy",
    "MAPElitesStrategy",
    "NotVmappableError",
    "Strategy",
    "population_forward",
]
__version__ = "0.1.0"
