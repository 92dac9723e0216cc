"""dpruner-lightning: D-PRUNER domain-specific LLM pruning (Zhang et al., NAACL 2024) on PyTorch Lightning.

Layers, bottom up: ``algorithms`` (pure torch) and ``methods`` (one interface for D-PRUNER and every
baseline) <- the Lightning layer (``module``, ``data``, ``callbacks``, ``cli``) <- evaluation,
export, analysis and the convenience API re-exported here.
"""

__version__ = "0.1.0"

from .analysis import MaskAnalyzer, PerformanceTracker  # noqa: E402
from .api import DPruner, DPrunerConfig, load_sample_data  # noqa: E402
from .benchmark import BenchmarkSuite, ExperimentRunner  # noqa: E402
from .config import MaskSpec, ModelSpec, OutputSpec, TargetSpec  # noqa: E402
from .data import CalibrationDataModule  # noqa: E402
from .methods import METHODS, DPrunerMethod, LLMPrunerMethod, MagnitudeMethod, SparseGPTMethod, WandaMethod, make_method  # noqa: E402
from .module import DPrunerModule  # noqa: E402
from .sources import TextSource  # noqa: E402

__all__ = [
    "BenchmarkSuite", "CalibrationDataModule", "DPruner", "DPrunerConfig", "DPrunerMethod", "DPrunerModule",
    "ExperimentRunner", "LLMPrunerMethod", "METHODS", "MagnitudeMethod", "MaskAnalyzer", "MaskSpec", "ModelSpec", "OutputSpec",
    "PerformanceTracker", "SparseGPTMethod", "TargetSpec", "TextSource", "WandaMethod", "load_sample_data", "make_method",
]
