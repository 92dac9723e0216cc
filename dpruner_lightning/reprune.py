"""Pruning a fitted module again at another mask spec, without running its calibration passes again.

A method's passes (D-PRUNER's G and S, Wanda's input norms, LLM-Pruner's group importance, the
batches SparseGPT and every ``reconstruct`` replay) never see the mask spec: only
:meth:`~dpruner_lightning.methods.base.PruningMethod.prune` does. So one fit serves every sparsity:

* :class:`PruneSnapshot` records, right before the first prune, what pruning changes or frees: the
  target weights (a CPU copy: after an SGD pass these are the fine-tuned weights ``prune`` starts
  from), the method's attributes (a shallow copy: the tensors are shared, not copied; ``prune`` and
  ``release`` only rebind attributes such as D-PRUNER's ``original`` W0 or the collected ``batches``,
  they never write into them) and the module's stage;
* :func:`prune_again` restores the snapshot and prunes at the new spec, so the result equals a
  separate run at that spec (same masks, same weights: tested for D-PRUNER, SparseGPT, a
  ``reconstruct`` method and LLM-Pruner in ``tests/test_sweep_reuse.py``).

A structured method (LLM-Pruner) shrinks the shapes in place: restoring it reloads the dense model from
its spec (and casts it to the dtype the Trainer had given the first one); its importance is kept.

Used by the step-by-step API (``DPruner.step3_prune_model`` called again) and by ``compare`` / ``sweep``
/ ``ExperimentRunner`` (:mod:`comparison`), whose rows that differ only in sparsity share one fit:
:class:`SnapshotBeforePruning` takes the snapshot inside that fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import lightning as L
import torch

from .config import MaskSpec
from .memory import PeakMemory
from .pruning import PruneResult, check_mask_shapes

log = logging.getLogger(__name__)

#: Method attributes set by ``prepare`` from the module's model: the module's, never restored from a snapshot.
_BOUND = ("model", "targets")


@dataclass
class PruneSnapshot:
    """What pruning changes, taken right before a module's first prune (see the module docstring)."""

    weights: dict[str, torch.Tensor]
    """CPU copies of the target weights (empty for a structured method: its model is reloaded)."""
    method_state: dict[str, Any]
    stage: str

    @classmethod
    def take(cls, module) -> "PruneSnapshot":
        if module.pruned:
            raise RuntimeError("PruneSnapshot.take: the module is already pruned; take the snapshot before the first prune")
        method = module.method
        weights = {} if method.structured else {n: t.weight.detach().cpu().clone() for n, t in module.targets.items()}
        state = {k: v for k, v in vars(method).items() if k not in _BOUND}
        return cls(weights=weights, method_state=state, stage=module.stage)

    @torch.no_grad()
    def restore(self, module) -> None:
        """Put the weights, the method's attributes and the stage back as they were before the first prune."""
        method = module.method
        bound = {k: v for k, v in vars(method).items() if k in _BOUND}
        vars(method).clear()  # attributes a prune added (e.g. a structured plan) go too
        vars(method).update(self.method_state)
        vars(method).update(bound)
        if method.structured:
            _reload_dense(module)
        else:
            for name, t in module.targets.items():
                t.weight.copy_(self.weights[name])
        module.stage = self.stage
        module.result = None


def _reload_dense(module) -> None:
    """A structured method's dense model: loaded again from the spec, on the device and in the dtype the
    Trainer had put the first one (``bf16-true`` casts the model when fit starts); ``prepare`` rebinds
    the method to it."""
    old = next(module.model.parameters())
    module.load_model()
    module.model.to(device=old.device, dtype=old.dtype)


def prune_again(module, spec: MaskSpec, snapshot: PruneSnapshot, on_restored: Callable[[Any], None] | None = None) -> PruneResult:
    """Restore ``snapshot`` and prune ``module`` under ``spec`` (which becomes the module's mask spec);
    records the mask phase's seconds and peak memory as the mask callback does. ``on_restored(module)``
    runs between the two (e.g. to total the importance before the masks zero any weight)."""
    snapshot.restore(module)
    if on_restored is not None:
        on_restored(module)
    module.method.check_mask_spec(spec)
    check_mask_shapes(module.targets, spec, module.method)
    module.mask_spec = spec
    if "mask" in module.hparams:  # what the logger's hparams (and a saved config) say this row pruned with
        module.hparams["mask"] = spec
    with PeakMemory() as memory:
        result = module.apply_pruning(spec)
    module.phase_seconds["mask"] = result.seconds
    module.peak_memory["mask"], module.peak_memory_kind = memory.peak_bytes, memory.kind
    return result


class SnapshotBeforePruning(L.Callback):
    """Takes a :class:`PruneSnapshot` when training ends, before the mask callback prunes: a Trainer's
    own callbacks run before the ones the module adds (``configure_callbacks``), so pass it to the
    Trainer (``trainer.callbacks.append(...)``)."""

    def __init__(self) -> None:
        self.snapshot: PruneSnapshot | None = None

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if pl_module.apply_masks_at_end:
            self.snapshot = PruneSnapshot.take(pl_module)  # raises if the masks were applied already
