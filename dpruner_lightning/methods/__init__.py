"""Pruning methods behind one interface (:class:`PruningMethod`): D-PRUNER and the baselines."""

from __future__ import annotations

from typing import Any

from .base import CalibrationPass, PruningMethod
from .dpruner import DPrunerMethod
from .llm_pruner import LLMPruner
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

#: Registry of the built-in methods by their short name (the ``name`` of ``compare``/``sweep`` entries).
METHODS: dict[str, type[PruningMethod]] = {
    "d_pruner": DPrunerMethod,
    "magnitude": Magnitude,
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
    "llm_pruner": LLMPruner,
}


def method_class(name: str) -> type[PruningMethod]:
    """The registered class called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; valid names: {', '.join(METHODS)}") from None


def make_method(name: str, **kwargs: Any) -> PruningMethod:
    """Instantiate a registered method, e.g. ``make_method("wanda", source="general")``."""
    return method_class(name)(**kwargs)


__all__ = [
    "CalibrationPass",
    "PruningMethod",
    "DPrunerMethod",
    "Magnitude",
    "Wanda",
    "SparseGPT",
    "LLMPruner",
    "METHODS",
    "make_method",
    "method_class",
]
