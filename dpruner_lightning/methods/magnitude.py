"""Magnitude pruning: the importance of a weight is |W|. Needs no calibration data."""

from __future__ import annotations

import torch

from .base import PruningMethod


class Magnitude(PruningMethod):
    name = "magnitude"
    default_granularity = "layer"

    def scores(self) -> dict[str, torch.Tensor]:
        return {name: w.detach().float().abs() for name, w in self.weights().items()}
