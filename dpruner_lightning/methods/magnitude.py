"""Magnitude pruning: the importance of a weight is |W|. Needs no calibration data (unless its kept
weights are reconstructed, which replays calibration batches)."""

from __future__ import annotations

import torch

from .base import PruningMethod


class MagnitudeMethod(PruningMethod):
    name = "magnitude"
    default_granularity = "layer"

    def __init__(self, reconstruct: str = "none", hessian_mix: float = 0.0) -> None:
        """
        Args:
            reconstruct: re-solve the kept weights after masking: ``none``, ``obs`` or ``exact``.
            hessian_mix: open-domain share of the reconstruction Hessian (0: domain only).
        """
        super().__init__()
        self.configure_reconstruction(reconstruct, hessian_mix)

    def scores(self) -> dict[str, torch.Tensor]:
        return {name: w.detach().float().abs() for name, w in self.weights().items()}

    def __repr__(self) -> str:
        return f"MagnitudeMethod(reconstruct={self.reconstruct!r}, hessian_mix={self.hessian_mix})"
