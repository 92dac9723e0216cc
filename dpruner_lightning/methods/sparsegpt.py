"""SparseGPT (Frantar & Alistarh, 2023) behind the method interface.

One ``collect`` pass keeps the calibration ``input_ids``; :meth:`SparseGPT.prune` then runs the faithful
sequential algorithm (:func:`~dpruner_lightning.algorithms.sparsegpt.sequential_sparsegpt`): decoder
block after decoder block, each block's Hessians measured on the outputs of the already pruned blocks,
OBS weight updates with lazy batching, and per-``block_size``-column adaptive masks (or N:M).

Unlike the score-based methods, SparseGPT changes the kept weights too, so it defines no
:meth:`scores` (and saves no importance artifact).

One process only (``multi_process = False``): the sequential algorithm replays the calibration batches
itself, so under DDP each rank would prune with its own share of them; the calibration pass refuses
to start on several processes (``NotImplementedError``) rather than give per-rank masks.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..algorithms.masks import parse_granularity
from ..algorithms.sparsegpt import sequential_sparsegpt
from ..config import MaskSpec
from .base import CalibrationPass, PruningMethod

#: Granularities SparseGPT can honour: its own adaptive per-block masks (``auto``/``layer``/``block``
#: all mean that: every block of columns, hence every matrix, is pruned to the sparsity) or N:M.
_UNSTRUCTURED = ("layer", "block")


class SparseGPT(PruningMethod):
    name = "sparsegpt"
    default_granularity = "block"
    multi_process = False

    def __init__(self, source: Literal["general", "domain"] = "domain", damp: float = 0.01) -> None:
        """
        Args:
            source: which calibration set the Hessians are measured on (Wanda's default, ``domain``).
            damp: Hessian dampening, a fraction of mean(diag H).
        """
        super().__init__()
        if source not in ("general", "domain"):
            raise ValueError(f"source must be 'general' or 'domain'; got {source!r}")
        if not damp > 0:
            raise ValueError(f"damp must be positive; got {damp}")
        self.source = source
        self.damp = damp
        self.batches: list[torch.Tensor] = []

    def passes(self) -> list[CalibrationPass]:
        return [CalibrationPass("calibration", self.source, "collect")]

    def check_mask_spec(self, spec: MaskSpec) -> None:
        """Reject mask settings SparseGPT cannot honour (called when the module is built)."""
        kind, _, _ = parse_granularity(spec.resolved_granularity(self.default_granularity))
        if kind not in (*_UNSTRUCTURED, "n:m"):
            raise ValueError(
                f"SparseGPT chooses its own adaptive masks per block of {spec.block_size} columns (or N:M): "
                f"mask.granularity {spec.granularity!r} is not supported; use 'auto' or an N:M pattern such as '2:4'"
            )
        if spec.allocation != "uniform":
            raise ValueError(f"SparseGPT prunes every matrix at the same sparsity: allocation {spec.allocation!r} is not supported")

    def start_pass(self, p: CalibrationPass) -> None:
        self.batches = []

    def collect(self, p: CalibrationPass, input_ids: torch.Tensor) -> None:
        self.batches.append(input_ids.detach())

    def artifacts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    def tolerance(self, shape: tuple[int, int], granularity: str, block_size: int) -> float:
        """Largest realised-sparsity error of one matrix: each column block floors its count (< 1 entry)."""
        kind, _, _ = parse_granularity(granularity)
        if kind == "n:m":
            return 1e-9
        return -(-shape[1] // block_size) / (shape[0] * shape[1]) + 1e-9

    @torch.no_grad()
    def prune(self, spec: MaskSpec) -> dict[str, torch.Tensor]:
        self.check_mask_spec(spec)
        if not self.batches:
            raise RuntimeError("SparseGPT has no calibration batches: run its calibration pass first")
        kind, n, m = parse_granularity(spec.resolved_granularity(self.default_granularity))
        masks = sequential_sparsegpt(
            self.model, self.targets, self.batches, spec.sparsity if kind != "n:m" else 0.0,
            prune_n=n, prune_m=m, block_size=spec.block_size, damp=self.damp,
        )
        self.batches = []  # the calibration activations are no longer needed
        return masks

    def __repr__(self) -> str:
        return f"SparseGPT(source={self.source!r}, damp={self.damp})"
