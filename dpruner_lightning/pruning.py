"""The pruning core, without Lightning: run a method's calibration passes, choose / check / apply its
masks, save the artifacts. Results are values (:class:`PruneResult`), not attributes set on a module.

The Lightning layer (:mod:`module`, :mod:`callbacks`) calls these same functions from its hooks:
:func:`calibration_step` is its ``training_step``, :func:`prune` and :func:`save_artifacts` run when
training ends. :func:`calibrate` is the whole loop for callers without a Trainer (tests, notebooks)::

    model = load_causal_lm(spec); targets = find_targets(model)
    dense = DenseReference.of(model, targets)
    method.prepare(model, targets)
    calibrate(model, targets, method, {"general": general_batches, "domain": domain_batches})
    result = prune(model, targets, method, MaskSpec(sparsity=0.5), dense)
    save_artifacts("runs/mine", result, model, tokenizer, method, OutputSpec())

A batch is a ``[batch, seq_len]`` tensor of token ids; each source is an iterable that can be walked
once per epoch of a pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import nn

from .algorithms.masks import check_realised, parse_granularity, realised_sparsity
from .algorithms.sharding import realised_sparsity_sharded
from .algorithms.targets import Target
from .config import MaskSpec, OutputSpec
from .export import check_finite, export_hf_folder, read_safetensors, save_sparse_model, save_tensors
from .methods.base import CalibrationPass, PruningMethod

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseReference:
    """What the model looked like when it was loaded: sparsity of a structured method (shapes shrink)
    is reported against these counts."""

    parameters: dict[str, int]
    """``targets`` and ``all`` parameter counts."""
    shapes: dict[str, tuple[int, int]]
    """``out x in`` shape of every target."""

    @classmethod
    def of(cls, model: nn.Module, targets: Mapping[str, Target]) -> "DenseReference":
        return cls(parameters={"targets": sum(t.numel() for t in targets.values()),
                               "all": sum(p.numel() for p in model.parameters())},
                   shapes={n: t.full_shape for n, t in targets.items()})


@dataclass
class PruneResult:
    """What :func:`prune` did: the masks, the sparsity requested and realised, and how long it took."""

    method: str
    method_repr: str
    granularity: str
    """``layer`` / ``row`` / ``block`` / ``global`` / ``N:M``, or ``structured`` (shapes shrank)."""
    allocation: str
    sparsity_target: float
    sparsity_realised: dict[str, float]
    """Fraction removed: ``targets`` (target weights) and ``all_parameters``."""
    per_matrix: dict[str, float]
    parameters: dict[str, Optional[int]]
    """Remaining ``targets`` / ``all`` counts and their dense counts (``targets_dense`` / ``all_dense``)."""
    masks: dict[str, torch.Tensor] = field(repr=False)
    """Keep-masks (``out x in``, True = kept); empty for a structured method."""
    structured: Optional[dict] = None
    """A structured method's plan (what was removed, how to reload)."""
    seconds: float = 0.0

    def summary(self) -> dict:
        """The JSON-able part (no masks, no per-matrix list), as ``summary.json`` reports it."""
        out = {k: v for k, v in asdict(self).items() if k not in ("masks", "per_matrix", "structured", "seconds")}
        if self.structured is not None:
            out["structured"] = self.structured
        return out


# -- calibration -----------------------------------------------------------------------------------
def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


def calibration_step(model: nn.Module, method: PruningMethod, p: CalibrationPass, input_ids: torch.Tensor,
                     backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> Optional[torch.Tensor]:
    """One micro-batch of pass ``p``; returns the loss of a gradient pass (after ``backward``), else None.
    The caller then hands the gradients to ``method.after_backward`` and, for ``sgd``, steps."""
    if p.mode == "none":
        return None
    if p.mode == "collect":
        method.collect(p, input_ids)
        return None
    if p.mode == "forward":
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
        return None
    loss = lm_loss(model, input_ids)
    backward(loss)
    return loss


def calibrate(model: nn.Module, targets: Mapping[str, Target], method: PruningMethod,
              batches: Mapping[str, Iterable[torch.Tensor]], passes: Optional[list[CalibrationPass]] = None,
              ) -> dict[str, float]:
    """Run ``passes`` (default: all of the method's) on one process; returns the seconds of each pass.

    The same order as the Lightning layer: gradients reach ``after_backward`` first (which turns them
    into the step: D-PRUNER clips the task gradient and applies the proximal division there), then
    ``sgd_step``."""
    seconds: dict[str, float] = {}
    method.world_size, method.step_stats = 1, False  # one process; nothing here logs per-step statistics
    method.gradients_final_in_backward = True  # no loss scaler or all-reduce comes after autograd here
    for t in targets.values():
        t.weight.requires_grad_(True)
    try:
        for p in passes if passes is not None else method.passes():
            t0 = time.perf_counter()
            method.start_pass(p)
            for _ in range(p.epochs):
                for input_ids in batches[p.source]:
                    if calibration_step(model, method, p, input_ids) is None:
                        continue
                    method.after_backward(p)
                    if p.mode == "sgd" and method.learning_rate > 0:
                        method.sgd_step(p)
                    for t in targets.values():
                        t.weight.grad = None
            method.end_pass(p)
            seconds[p.name] = time.perf_counter() - t0
    finally:
        for t in targets.values():
            t.weight.requires_grad_(False)
    return seconds


# -- checks ----------------------------------------------------------------------------------------
def nonfinite_hint(method: PruningMethod, weights_changed: bool) -> str:
    """The setting that most likely produced NaN / inf in the weights, scores or outputs."""
    if weights_changed and method.learning_rate > 0:  # an SGD pass changed the weights
        if getattr(method, "update", None) == "sgd":
            return (f"likely cause: alpha / lambda_reg too large for update='sgd' (alpha={getattr(method, 'alpha', '?')}, "
                    f"lambda_reg={getattr(method, 'lambda_reg', '?')}): use update='proximal' or a smaller alpha")
        return (f"likely cause: the SGD pass diverged (learning rate {method.learning_rate}): use a smaller alpha "
                "or set max_grad_norm")
    return ("likely cause: an overflow in the model's dtype (float16: use bfloat16 or float32) or non-finite weights "
            "in the model as loaded")


def check_weights_finite(targets: Mapping[str, Target], what: str, hint: str) -> None:
    """Raise :class:`~dpruner_lightning.export.NonFiniteError` naming the first target weight with NaN / inf."""
    check_finite({n: t.weight_view() for n, t in targets.items()}, what, hint)  # sharded: this rank's rows


def check_mask_shapes(targets: Mapping[str, Target], spec: MaskSpec, method: PruningMethod) -> None:
    """An N:M pattern needs every target's input width divisible by M: say so before any pass runs."""
    if method.structured:
        return
    kind, n, m = parse_granularity(spec.resolved_granularity(method.default_granularity))
    if kind != "n:m":
        return
    bad = {name: t.shape for name, t in targets.items() if t.shape[1] % m}
    if bad:
        shown = ", ".join(f"{k} (in_features {v[1]})" for k, v in list(bad.items())[:3])
        raise ValueError(f"granularity {n}:{m} needs every target's in_features divisible by {m}; {len(bad)} are not: "
                         f"{shown}. Exclude them (targets.exclude_modules) or choose another pattern.")


def _structured_report(report: dict, targets: Mapping[str, Target], dense: DenseReference) -> dict:
    """A structurally pruned model's sparsity: the fraction of the ORIGINAL target / all parameters
    removed (zeros inside the remaining weights are not counted)."""
    per_matrix = {n: 1.0 - targets[n].numel() / (rows * cols) for n, (rows, cols) in dense.shapes.items()}
    return dict(report, per_matrix=per_matrix,
                targets=1.0 - report["target_parameters"] / max(1, dense.parameters["targets"]),
                all_parameters=1.0 - report["all_parameter_count"] / max(1, dense.parameters["all"]))


def _check_request(report: dict, masks: Mapping[str, torch.Tensor], spec: MaskSpec, granularity: str,
                   method: PruningMethod) -> None:
    """Every mask removes what was asked (up to the method's rounding), and the realised zeros agree."""
    # count_nonzero reads the bool mask as it is (mask_sparsity's float copy costs ~4x more per matrix)
    requested = {n: 1.0 - int(k.count_nonzero()) / max(1, k.numel()) for n, k in masks.items()}
    shapes = {n: tuple(k.shape) for n, k in masks.items()}
    check_realised(report["per_matrix"], requested, shapes, "layer", spec.block_size)
    target = spec.target_sparsity(method.default_granularity)
    if spec.allocation == "uniform" and granularity != "global":
        tol = method.tolerance
        off = {n: s for n, s in requested.items() if abs(s - target) > tol(shapes[n], granularity, spec.block_size)}
        if off:
            raise RuntimeError(f"masks do not match the requested sparsity {target}: {dict(list(off.items())[:5])}")
    elif abs(report["targets"] - target) > 0.01:
        raise RuntimeError(f"overall target sparsity {report['targets']:.4f} is off the request {target}")


# -- resuming ---------------------------------------------------------------------------------------
def load_saved_importance(method: PruningMethod, folder: str | Path) -> list[str]:
    """Hand the importance files of an earlier run folder to ``method``; returns the passes they replace."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"resume_from: no run folder at {folder}")
    files = sorted(folder.glob("*importance.safetensors"))
    if not files:
        raise ValueError(f"resume_from: {folder} holds no saved importance (*importance.safetensors); was "
                         "output.save_importance off in that run?")
    groups, saved_repr = {}, ""
    for path in files:
        groups[path.stem], metadata = read_safetensors(path)
        saved_repr = metadata.get("method_repr", saved_repr)
    done = method.load_artifacts(groups, saved_repr)
    log.info("resume_from %s: reusing %s, skipping pass(es) %s", folder, sorted(groups), done)
    return done


# -- pruning ---------------------------------------------------------------------------------------
@torch.no_grad()
def prune(model: nn.Module, targets: Mapping[str, Target], method: PruningMethod, spec: MaskSpec,
          dense: DenseReference, weights_changed: bool = False) -> PruneResult:
    """Choose and apply ``method``'s masks under ``spec``, check the weights are finite and the realised
    sparsity is what was asked, and return what was done. ``weights_changed``: an SGD pass ran (only
    used to name the likely cause of NaN / inf)."""
    t0 = time.perf_counter()
    masks = method.prune(spec)
    check_weights_finite(targets, "target weights after pruning", nonfinite_hint(method, weights_changed))
    if method.sharded:  # every rank holds slices: count them all (the weights themselves, not their views)
        report = realised_sparsity_sharded(model, {n: t.weight for n, t in targets.items()})
    else:
        report = realised_sparsity(model, {n: t.weight_view() for n, t in targets.items()})
    granularity = spec.resolved_granularity(method.default_granularity)
    structured = None
    if method.structured:  # shapes shrank: "sparsity" = fraction of the original parameters removed
        report = _structured_report(report, targets, dense)
        granularity = "structured"
        structured = dict(method.plan_summary, reload="dpruner_lightning.algorithms.structured.load_structured_pruned")
    if masks:
        _check_request(report, masks, spec, granularity, method)
    result = PruneResult(
        method=method.name, method_repr=repr(method), granularity=granularity, allocation=spec.allocation,
        sparsity_target=spec.target_sparsity(method.default_granularity),
        sparsity_realised={"targets": report["targets"], "all_parameters": report["all_parameters"]},
        per_matrix=dict(report["per_matrix"]),
        parameters={"targets": report["target_parameters"], "all": report["all_parameter_count"],
                    "targets_dense": dense.parameters["targets"], "all_dense": dense.parameters["all"]},
        masks=masks, structured=structured, seconds=time.perf_counter() - t0)
    log.info("pruned: %.4f of target weights, %.4f of all parameters are %s", result.sparsity_realised["targets"],
             result.sparsity_realised["all_parameters"], "removed" if structured else "zero")
    return result


def save_importance(folder: str | Path, method: PruningMethod, groups: Optional[Iterable[str]] = None,
                    written_before: Mapping[str, str] | None = None,
                    artifacts: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> dict[str, str]:
    """The method's artifact groups (e.g. ``general_importance``) as ``<folder>/<group>.safetensors``;
    ``groups`` limits them (e.g. to what one pass produced); a group ``written_before`` to that same
    path (``{group: path}``) is not written again; ``artifacts``: the groups to write instead of
    ``method.artifacts()`` (e.g. gathered from the ranks' shards). Returns the paths written."""
    folder, written = Path(folder), {}
    before = written_before or {}
    for group, tensors in (method.artifacts() if artifacts is None else artifacts).items():
        path = folder / f"{group}.safetensors"
        if tensors and (groups is None or group in groups) and before.get(group) != str(path):
            meta = {"method": method.name, "method_repr": repr(method)}  # what resume_from checks
            written[group] = str(save_tensors(path, tensors, meta))
    return written


def save_artifacts(folder: str | Path, result: PruneResult, model: nn.Module, tokenizer, method: PruningMethod,
                   output: OutputSpec, written_before: Mapping[str, str] | None = None,
                   artifacts: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> dict[str, str]:
    """Write what ``output`` asks for into ``folder``: importance (except groups ``written_before``
    there, e.g. saved when their pass ended; ``artifacts``: see :func:`save_importance`), masks, the HF
    folder (``pruned_model/``) and our sparse format (``sparse_model/``), compressed-tensors' 2:4 layout
    (``compressed_24_model/``). Returns ``{artifact: path}`` of what it wrote."""
    folder = Path(folder)
    written: dict[str, str] = {}
    if output.save_importance:
        written.update(save_importance(folder, method, written_before=written_before, artifacts=artifacts))
    if output.save_masks and result.masks:
        written["masks"] = str(save_tensors(folder / "masks.safetensors", result.masks, {"layout": "out x in, 1 = kept"}))
    if output.export_model:
        written["pruned_model"] = str(export_hf_folder(model, tokenizer, folder / "pruned_model"))
    if output.export_sparse and result.masks:
        written["sparse_model"] = str(save_sparse_model(model, list(method.targets), tokenizer, folder / "sparse_model"))
    if output.export_compressed_24:  # 2:4 masks, checked when the run was configured (OutputSpec.check_mask)
        from .deploy import export_compressed_24  # needs the [deploy] extra: imported only when asked for

        written["compressed_24_model"] = str(export_compressed_24(model, tokenizer, folder / "compressed_24_model",
                                                                  list(method.targets)))
    return written
