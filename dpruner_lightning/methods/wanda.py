"""Wanda (Sun et al., ICLR 2024): importance |W_ij| * ||X_j||_2, compared within each output row.

One forward pass over the calibration set on the dense model collects the input-column norms of every
target (the original runs block by block on the partially pruned model; one dense pass is cheaper
and is what we compare against: say so when quoting numbers).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..algorithms.hessian import InputStatistics
from .base import CalibrationPass, PruningMethod


class WandaMethod(PruningMethod):
    name = "wanda"
    default_granularity = "row"

    def __init__(self, source: Literal["general", "domain"] = "domain", reconstruct: str = "none",
                 hessian_mix: float = 0.0, state_device: Literal["auto", "cpu"] = "auto") -> None:
        """
        Args:
            source: which calibration set feeds the input norms.
            reconstruct: re-solve the kept weights after masking: ``none``, ``obs`` or ``exact``.
            hessian_mix: open-domain share of the reconstruction Hessian (0: domain only).
            state_device: where the input norms are accumulated: ``auto`` (the inputs' device) or ``cpu``.
        """
        super().__init__()
        if source not in ("general", "domain"):
            raise ValueError(f"source must be 'general' or 'domain'; got {source!r}")
        self.source = source
        self.configure_reconstruction(reconstruct, hessian_mix)
        self.configure_state_device(state_device)
        self.norms: dict[str, torch.Tensor] = {}

    def scoring_passes(self) -> list[CalibrationPass]:
        return [CalibrationPass("calibration", self.source, "forward")]

    def start_pass(self, p: CalibrationPass) -> None:
        if p.mode == "collect":
            return super().start_pass(p)
        self._stats = InputStatistics(self.targets, kind="sq_norm", device="cpu" if self.state_device == "cpu" else None)
        self._stats.attach()

    def reduce_across_ranks(self, p: CalibrationPass, all_reduce_sum) -> None:
        self._stats.all_reduce_(self.state_collective(all_reduce_sum))  # input norms of all ranks' tokens

    def end_pass(self, p: CalibrationPass) -> None:
        if p.mode == "collect":
            return
        self._stats.detach()
        self.norms = {n: self._stats.sq_norm(n).sqrt() for n in self.targets}
        del self._stats

    def scores(self) -> dict[str, torch.Tensor]:
        if not self.norms:
            raise RuntimeError("Wanda has no input norms: run its calibration pass first")
        return {n: w.detach().float().abs() * self.norms[n].to(w.device)[None, :] for n, w in self.weights().items()}

    def __repr__(self) -> str:
        return f"WandaMethod(source={self.source!r}, reconstruct={self.reconstruct!r}, hessian_mix={self.hessian_mix})"
