"""SparseGPT (Frantar & Alistarh, 2023) behind the method interface.

``collect`` passes keep the calibration ``input_ids``; :meth:`SparseGPT.prune` then runs the faithful
sequential algorithm (:func:`~dpruner_lightning.algorithms.sparsegpt.sequential_sparsegpt`): decoder
block after decoder block, each block's Hessians measured on the outputs of the already pruned blocks,
OBS weight updates with lazy batching, and per-``block_size``-column adaptive masks (or N:M).
The Hessians come from the domain set, the open-domain set, or their mix ``hessian_mix``
(cross-calibration, Williams et al., arXiv:2502.18424).

Unlike the score-based methods, SparseGPT changes the kept weights too, so it defines no
:meth:`scores` (and saves no importance artifact).

One process only (``multi_process = False``): the sequential algorithm replays the calibration batches
itself, so under DDP each rank would prune with its own share of them; the calibration pass refuses
to start on several processes (``NotImplementedError``) rather than give per-rank masks.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from ..algorithms.masks import parse_granularity
from ..algorithms.sparsegpt import sequential_sparsegpt
from ..config import MaskSpec
from .base import CalibrationPass, PruningMethod

#: Granularities SparseGPT can honour: its own adaptive per-block masks (``auto``/``layer``/``block``
#: all mean that: every block of columns, hence every matrix, is pruned to the sparsity) or N:M.
_UNSTRUCTURED = ("layer", "block")


def check_sequential_mask_spec(spec: MaskSpec, default_granularity: str, who: str = "SparseGPT") -> None:
    """Masks chosen inside the sequential OBS solve: per-``block_size``-column blocks or N:M only."""
    kind, _, _ = parse_granularity(spec.resolved_granularity(default_granularity))
    if kind not in (*_UNSTRUCTURED, "n:m"):
        raise ValueError(
            f"{who} chooses its own adaptive masks per block of {spec.block_size} columns (or N:M): "
            f"mask.granularity {spec.granularity!r} is not supported; use 'auto' or an N:M pattern such as '2:4'"
        )
    if spec.allocation != "uniform":
        raise ValueError(f"{who} prunes every matrix at the same sparsity: allocation {spec.allocation!r} is not supported")


class SparseGPTMethod(PruningMethod):
    name = "sparsegpt"
    default_granularity = "block"
    multi_process = False

    def __init__(self, source: Literal["general", "domain"] = "domain", damp: float = 0.01,
                 hessian_mix: Optional[float] = None, reconstruct: Literal["obs", "exact"] = "obs") -> None:
        """
        Args:
            source: which calibration set the Hessians are measured on (Wanda's default, ``domain``);
                ignored when ``hessian_mix`` is given.
            damp: Hessian dampening, a fraction of mean(diag H).
            hessian_mix: open-domain share of the Hessians, ``(1 - mix) H_domain + mix H_general``;
                default: 0 for ``source: domain``, 1 for ``source: general``.
            reconstruct: ``obs`` (SparseGPT's own greedy update of the kept weights) or ``exact`` (its
                masks, then the exact least-squares kept weights for them).
        """
        super().__init__()
        if source not in ("general", "domain"):
            raise ValueError(f"source must be 'general' or 'domain'; got {source!r}")
        if not damp > 0:
            raise ValueError(f"damp must be positive; got {damp}")
        self.source = source
        self.damp = damp
        if reconstruct not in ("obs", "exact"):
            raise ValueError(f"SparseGPT's reconstruct must be 'obs' (its own update) or 'exact'; got {reconstruct!r}")
        mix = (1.0 if source == "general" else 0.0) if hessian_mix is None else hessian_mix
        self.configure_reconstruction(reconstruct, mix)

    def needs_batches(self) -> bool:
        return True

    def scoring_passes(self) -> list[CalibrationPass]:
        return []  # everything happens in prune(), on the collected batches

    def check_mask_spec(self, spec: MaskSpec) -> None:
        """Reject mask settings SparseGPT cannot honour (called when the module is built)."""
        check_sequential_mask_spec(spec, self.default_granularity)

    def artifacts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    def tolerance(self, shape: tuple[int, int], granularity: str, block_size: int) -> float:
        return sequential_tolerance(shape, granularity, block_size)

    @torch.no_grad()
    def prune(self, spec: MaskSpec) -> dict[str, torch.Tensor]:
        self.check_mask_spec(spec)
        return prune_sequentially(self, spec)

    def __repr__(self) -> str:
        extra = ", reconstruct='exact'" if self.reconstruct == "exact" else ""
        return f"SparseGPTMethod(hessian_mix={self.hessian_mix}, damp={self.damp}{extra})"


@torch.no_grad()
def prune_sequentially(method: PruningMethod, spec: MaskSpec,
                       priors: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """SparseGPT over ``method``'s targets and collected batches (its ``hessian_mix``, ``damp``, and
    ``reconstruct: exact`` for exact kept weights), with optional selection ``priors``; returns the
    masks and frees the batches."""
    kind, n, m = parse_granularity(spec.resolved_granularity(method.default_granularity))
    masks = sequential_sparsegpt(
        method.model, method.targets, [], spec.sparsity if kind != "n:m" else 0.0, prune_n=n, prune_m=m,
        block_size=spec.block_size, damp=method.damp, sets=method.weighted_batches(), priors=priors,
        exact=method.reconstruct == "exact",
    )
    method.batches = {}  # the calibration activations are no longer needed
    return masks


def sequential_tolerance(shape: tuple[int, int], granularity: str, block_size: int) -> float:
    """Largest realised-sparsity error of one matrix: each column block floors its count (< 1 entry)."""
    kind, _, _ = parse_granularity(granularity)
    if kind == "n:m":
        return 1e-9
    return -(-shape[1] // block_size) / (shape[0] * shape[1]) + 1e-9
