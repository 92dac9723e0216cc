"""Pruning methods behind one interface (:class:`PruningMethod`): D-PRUNER and the baselines."""

from .base import CalibrationPass, PruningMethod
from .dpruner import DPruner
from .magnitude import Magnitude
from .wanda import Wanda

__all__ = ["CalibrationPass", "PruningMethod", "DPruner", "Magnitude", "Wanda"]
