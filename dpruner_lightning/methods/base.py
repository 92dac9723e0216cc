"""The one interface every pruning method implements.

The lifecycle follows torch.ao's prepare / step / squash: :meth:`PruningMethod.prepare` once, then
for every calibration pass :meth:`start_pass`, per micro-batch :meth:`after_backward` (gradient passes)
or :meth:`collect` (methods that replay batches themselves), :meth:`end_pass`, and finally
:meth:`prune`. Methods are pure torch: the Lightning layer only decides *when* each hook runs (which
epoch, which batch) and feeds the data; a method never sees a Trainer.

Several processes (DDP): every rank accumulates over its own share of the calibration batches, with
local (un-synchronised) gradients; before :meth:`end_pass` the Lightning layer calls
:meth:`reduce_across_ranks` with an in-place all-reduce-sum function, and the method turns its
accumulators into global sums, so scores and masks are the same on every rank and equal to one
process over all the batches. A method that accumulates anything must implement it; one that cannot
run on several processes sets :attr:`multi_process` to False (the layer then refuses to start).

Reconstruction. A mask method may also re-solve its kept weights after choosing the masks
(``reconstruct``: ``obs`` or ``exact``, see :mod:`~dpruner_lightning.algorithms.reconstruct`), block
by block on the outputs of the already reconstructed blocks, with the layer Hessians of the domain
calibration set, the open-domain one, or the mix ``(1 - hessian_mix) H_domain + hessian_mix H_general``.
The batches are gathered by extra ``collect`` passes (:meth:`batch_passes`); reconstruction runs on
one process only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping, Optional

import torch
from torch import nn

from ..algorithms.masks import apply_mask_, choose_masks, expected_tolerance
from ..algorithms.reconstruct import check_solver, reconstruct_
from ..algorithms.sequential import sequential_blockwise, weighted_sets
from ..algorithms.targets import Target, block_index, find_decoder_blocks
from ..config import MaskSpec

PassMode = Literal["forward", "backward", "sgd", "collect", "none"]

#: In-place sum of a tensor over all ranks (returns it); the identity on one process.
AllReduceSum = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CalibrationPass:
    """One "fit" phase over a calibration set.

    ``mode``: ``forward`` (no grad; the method's input hooks see every target's inputs), ``backward``
    (LM-loss gradients reach :meth:`PruningMethod.after_backward`, weights unchanged), ``sgd`` (the same,
    then a plain SGD step), ``collect`` (batches handed to :meth:`PruningMethod.collect`), ``none``
    (nothing to compute: a data-free method still gets one pass so the dense model is validated)."""

    name: str
    source: Literal["general", "domain"]
    mode: PassMode
    epochs: int = 1


class PruningMethod:
    """Base class: subclasses set :attr:`name`, :attr:`default_granularity`, and override the hooks."""

    name: str = "base"
    default_granularity: str = "layer"
    #: SGD learning rate used by ``sgd`` passes (0 for methods that never update weights).
    learning_rate: float = 0.0
    #: Gradient-norm clipping of ``sgd`` steps (None: no clipping).
    max_grad_norm: Optional[float] = None
    #: Whether the method can run its passes on several processes (see :meth:`reduce_across_ranks`).
    multi_process: bool = True
    #: Structured methods remove whole rows/columns (shapes shrink) and return no masks from prune().
    structured: bool = False
    #: Solver re-fitting the kept weights after the masks (``none`` | ``obs`` | ``exact``).
    reconstruct: str = "none"
    #: Weight of the open-domain set in the reconstruction Hessian (0: domain only, 1: general only).
    hessian_mix: float = 0.0
    #: Dampening of the reconstruction Hessian, a fraction of mean(diag H).
    damp: float = 0.01

    def __init__(self) -> None:
        self.targets: dict[str, Target] = {}
        #: What a structured prune did (reported in summary.json).
        self.plan_summary: dict = {}
        #: Calibration ``input_ids`` by source, gathered by the ``collect`` passes.
        self.batches: dict[str, list[torch.Tensor]] = {}

    def configure_reconstruction(self, reconstruct: str = "none", hessian_mix: float = 0.0) -> None:
        """Validate and set the reconstruction options (subclasses call it from ``__init__``)."""
        check_solver(reconstruct)
        if not 0.0 <= hessian_mix <= 1.0:
            raise ValueError(f"hessian_mix must be in [0, 1] (the open-domain share of the Hessian); got {hessian_mix}")
        if self.structured and reconstruct != "none":
            raise ValueError(f"{self.name} removes whole structures: reconstruct must be 'none'")
        self.reconstruct, self.hessian_mix = reconstruct, float(hessian_mix)
        if self.needs_batches():
            self.multi_process = False  # the sequential solve replays the batches of one process

    def check_mask_spec(self, spec: MaskSpec) -> None:
        """Reject mask settings the method cannot honour; called when the module is built (before compute)."""

    def tolerance(self, shape: tuple[int, int], granularity: str, block_size: int) -> float:
        """Largest allowed gap between a matrix's mask sparsity and the request (rounding of the selection)."""
        return expected_tolerance(shape, granularity, block_size)

    def state_bytes(self, shapes: Mapping[str, tuple[int, int]], weight_bytes: int) -> int:
        """Peak bytes of the method's own state for targets of these ``out x in`` shapes (memory
        estimate before a run). Default: one fp32 score per weight, plus the collected batches' layer
        Hessians of one decoder block when reconstructing (approximated as the largest target's)."""
        total = sum(r * c for r, c in shapes.values()) * 4
        if self.needs_batches() and shapes:
            total += max(c * c for _, c in shapes.values()) * 4 * len(self.batch_sources())
        return total

    # -- lifecycle ---------------------------------------------------------------------------------
    def passes(self) -> list[CalibrationPass]:
        """Every pass of the method: its scoring passes, then the batch collection it needs."""
        return self.scoring_passes() + self.batch_passes()

    def scoring_passes(self) -> list[CalibrationPass]:
        """The passes that compute the method's scores (override; default: one no-op pass)."""
        return [CalibrationPass("calibration", "general", "none")]

    def needs_batches(self) -> bool:
        """Whether :meth:`prune` replays calibration batches (sequential reconstruction)."""
        return self.reconstruct != "none"

    def batch_sources(self) -> list[str]:
        """The calibration sets whose batches :meth:`prune` replays, given ``hessian_mix``."""
        return [s for s, w in (("domain", 1.0 - self.hessian_mix), ("general", self.hessian_mix)) if w > 0]

    def batch_passes(self) -> list[CalibrationPass]:
        if not self.needs_batches():
            return []
        return [CalibrationPass(f"batches_{s}", s, "collect") for s in self.batch_sources()]

    def prepare(self, model: nn.Module, targets: Mapping[str, Target]) -> None:
        """Called once before the first pass, with the loaded model and its targets."""
        self.model = model
        self.targets = dict(targets)

    def load_artifacts(self, groups: Mapping[str, Mapping[str, torch.Tensor]], saved_repr: str) -> list[str]:
        """Take scores an earlier run saved (``{group: {target: tensor}}``, written by a method whose repr
        was ``saved_repr``) instead of recomputing them; returns the names of the passes they replace.
        Called before :meth:`prepare`. Methods that support resuming override it."""
        raise NotImplementedError(f"{self.name} cannot resume from saved importance (D-PRUNER can)")

    def start_pass(self, p: CalibrationPass) -> None:
        if p.mode == "collect":
            self.batches[p.source] = []

    @torch.no_grad()
    def after_backward(self, p: CalibrationPass) -> dict[str, float | torch.Tensor]:
        """Read (and possibly modify) ``target.weight.grad`` after one micro-batch; return stats to log
        (0-dim tensors are fine and avoid a host sync per matrix)."""
        return {}

    @torch.no_grad()
    def sgd_step(self, p: CalibrationPass) -> None:
        """One step of an ``sgd`` pass from ``target.weight.grad`` (as :meth:`after_backward` left it) at
        :attr:`learning_rate`; the layer calls it after averaging the gradients over ranks. Plain SGD
        in place; a method keeping fp32 master weights overrides it."""
        for t in self.targets.values():
            if t.weight.grad is not None:
                t.weight.add_(t.weight.grad, alpha=-self.learning_rate)

    def collect(self, p: CalibrationPass, input_ids: torch.Tensor) -> None:
        self.batches.setdefault(p.source, []).append(input_ids.detach())

    def weighted_batches(self) -> list[tuple[list[torch.Tensor], float]]:
        """The collected batches as ``(batches, weight)`` sets for the sequential solver."""
        missing = [s for s in self.batch_sources() if not self.batches.get(s)]
        if missing:
            raise RuntimeError(f"{self.name} has no {' / '.join(missing)} calibration batches: run its collect passes first")
        return weighted_sets(self.batches.get("domain", []), self.batches.get("general"), self.hessian_mix)

    def reduce_across_ranks(self, p: CalibrationPass, all_reduce_sum: AllReduceSum) -> None:
        """Several processes only: called once at the end of pass ``p``, before :meth:`end_pass`, on every
        rank. Replace every per-rank accumulator of the pass by its sum over ranks with
        ``all_reduce_sum`` (in place; call it in the same order on every rank). Default: nothing to sum."""

    def end_pass(self, p: CalibrationPass) -> None:
        pass

    # -- result ------------------------------------------------------------------------------------
    def scores(self) -> dict[str, torch.Tensor]:
        """Final importance of every target weight (``out x in``); higher = more important."""
        raise NotImplementedError(f"{type(self).__name__} does not define scores()")

    def artifacts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Named groups of per-target tensors worth saving and plotting (e.g. general / dual importance)."""
        return {"importance": self.scores()}

    @torch.no_grad()
    def prune(self, spec: MaskSpec) -> dict[str, torch.Tensor]:
        """Choose keep-masks from :meth:`scores` and zero the pruned weights (re-solving the kept ones
        with ``reconstruct``); returns the masks."""
        masks = self.choose_masks(spec)
        if self.reconstruct == "none":
            for name, keep in masks.items():
                apply_mask_(self.targets[name].weight_view(), keep)
        else:
            self.reconstruct_kept(masks, spec.block_size)
        return masks

    def choose_masks(self, spec: MaskSpec) -> dict[str, torch.Tensor]:
        """Keep-masks from :meth:`scores` under ``spec`` (granularity, allocation), weights untouched."""
        return choose_masks(
            self.scores(),
            spec.target_sparsity(self.default_granularity),
            spec.resolved_granularity(self.default_granularity),
            block_size=spec.block_size,
            allocation=spec.allocation,
            block_of=self.block_of(),
            owl_m=spec.owl_m,
            owl_lambda=spec.owl_lambda,
        )

    @torch.no_grad()
    def reconstruct_kept(self, masks: Mapping[str, torch.Tensor], block_size: int = 128) -> None:
        """Zero the pruned weights and re-solve the kept ones block by block (see the module docstring)."""
        def solve(name: str, target: Target, H: torch.Tensor) -> torch.Tensor:
            return reconstruct_(target.weight_view(), H, masks[name], self.reconstruct, self.damp, block_size)

        sequential_blockwise(self.model, self.targets, self.weighted_batches(), solve)

    def release(self) -> None:
        """Free what only :meth:`prune` needed (collected batches, copies of the weights); scores stay.
        The layer calls it once the artifacts are saved; prune again only before it."""
        self.batches = {}

    # -- helpers -----------------------------------------------------------------------------------
    def block_of(self) -> dict[str, int | None]:
        prefix, _ = find_decoder_blocks(self.model)
        return {name: block_index(name, prefix) for name in self.targets}

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: t.weight_view() for name, t in self.targets.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
