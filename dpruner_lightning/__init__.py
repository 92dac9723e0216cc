"""dpruner-lightning: D-PRUNER domain-specific LLM pruning (Zhang et al., NAACL 2024) on PyTorch Lightning."""

__version__ = "0.1.0"
