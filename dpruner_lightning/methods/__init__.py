"""Pruning methods behind one interface (:class:`PruningMethod`): D-PRUNER and the baselines.

Naming rule: every method class is ``<Name>Method``; its registry key (``name``) is the short form used
in ``compare`` / ``sweep`` entries. The earlier class names (``Magnitude``, ``Wanda``, ``SparseGPT``,
``LLMPruner``) stay importable as aliases, so existing configs keep working."""

from __future__ import annotations

from typing import Any

from .base import CalibrationPass, PruningMethod
from .dpruner import DPrunerMethod
from .llm_pruner import LLMPrunerMethod
from .magnitude import MagnitudeMethod
from .sparsegpt import SparseGPTMethod
from .wanda import WandaMethod

#: Registry of the built-in methods by their short name (the ``name`` of ``compare``/``sweep`` entries).
METHODS: dict[str, type[PruningMethod]] = {
    "d_pruner": DPrunerMethod,
    "magnitude": MagnitudeMethod,
    "wanda": WandaMethod,
    "sparsegpt": SparseGPTMethod,
    "llm_pruner": LLMPrunerMethod,
}


# Earlier names of the classes (configs written before the naming rule use them as class_path).
Magnitude, Wanda, SparseGPT, LLMPruner = MagnitudeMethod, WandaMethod, SparseGPTMethod, LLMPrunerMethod


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
    "MagnitudeMethod",
    "WandaMethod",
    "SparseGPTMethod",
    "LLMPrunerMethod",
    "METHODS",
    "make_method",
    "method_class",
]
