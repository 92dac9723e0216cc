"""Callbacks that drive a pruning method through a Lightning "fit".

* :class:`CalibrationPassCallback` - one per pass of the method (for D-PRUNER: the general-importance
  pass and the regularised dual pass): starts the pass, hands every micro-batch's gradients to the
  method in ``on_after_backward``, ends the pass, checks that the target weights and the method's
  tensors are finite (a NaN / inf stops the run, naming the matrix and the likely setting), and logs
  its time and importance histograms.
* :class:`MaskApplication` - when training ends: chooses and applies the masks, checks the realised
  sparsity, logs it per layer, and writes importance, masks and the pruned HF model. A structured
  method (``method.structured``, e.g. LLM-Pruner) returns no masks: its sparsity is the fraction of the
  parameters counted before pruning that were removed. Export folders are written aside and swapped
  in (see :func:`~dpruner_lightning.export.artifact_folder`): a ``pruned_model/`` or ``sparse_model/``
  holding files we did not write is refused when fit starts, before any pass.
* :class:`RunSummary` - keeps ``summary.json`` in the log directory up to date (after pruning and
  after every validation).

Artifacts are saved explicitly: ``ModelCheckpoint`` never fires when ``global_step`` stays 0.

Several processes (Lightning's DDP strategies only): at the end of each pass the method's accumulators
are summed across ranks (:meth:`PruningMethod.reduce_across_ranks`, given an in-place all-reduce-sum
built on ``trainer.strategy.reduce``) before :meth:`end_pass`, so every rank computes the same scores and
masks; artifacts and ``summary.json`` are written by rank 0 only. Other multi-process strategies
(FSDP, DeepSpeed) and methods with ``multi_process = False`` (SparseGPT) raise ``NotImplementedError``.
"""

from __future__ import annotations

import atexit
import logging
import resource
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from .algorithms.masks import check_realised, mask_sparsity, realised_sparsity
from .export import atomic_write_json, check_finite, check_replaceable, export_hf_folder, save_sparse_model, save_tensors

log = logging.getLogger(__name__)


def run_dir(trainer: L.Trainer) -> Path:
    """The run's log directory. ``trainer.log_dir`` is a collective (a broadcast) on several processes:
    call this on EVERY rank, and only then skip the writing on ranks other than 0."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def tensorboard(trainer: L.Trainer):
    """The TensorBoard ``SummaryWriter`` of the trainer, or None."""
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_histogram"):
            return exp
    return None


def subsample(t: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """At most ``n`` values of ``t`` as fp32 on the CPU (histograms of 7B tensors are not drawable)."""
    flat = t.detach().reshape(-1)
    if flat.numel() > n:
        idx = torch.randint(0, flat.numel(), (n,), generator=torch.Generator().manual_seed(seed))
        flat = flat[idx.to(flat.device)]
    return flat.float().cpu()


def add_histogram(writer, tag: str, t: torch.Tensor, samples: int, seed: int, step: int) -> None:
    """A TensorBoard histogram of (a subsample of) ``t``; an empty or non-finite tensor is skipped with a
    warning: TensorBoard cannot bin it ("The histogram is empty, please file a bug report")."""
    values = subsample(t, samples, seed)
    if values.numel() == 0 or not bool(torch.isfinite(values).all()):
        log.warning("TensorBoard histogram %s skipped: the tensor is empty or holds NaN / inf", tag)
        return
    try:
        writer.add_histogram(tag, values, step)
    except ValueError as err:  # finite but extreme values (~1e38) can still leave every bin empty
        log.warning("TensorBoard histogram %s skipped: %s", tag, err)


def nonfinite_hint(pl_module) -> str:
    """The setting that most likely produced NaN / inf in the module's weights, scores or outputs."""
    method = pl_module.method
    if pl_module.stage != "dense" and getattr(method, "learning_rate", 0) > 0:  # an SGD pass changed the weights
        if getattr(method, "update", None) == "sgd":
            return (f"likely cause: alpha / lambda_reg too large for update='sgd' (alpha={getattr(method, 'alpha', '?')}, "
                    f"lambda_reg={getattr(method, 'lambda_reg', '?')}): use update='proximal' or a smaller alpha")
        return (f"likely cause: the SGD pass diverged (learning rate {method.learning_rate}): use a smaller alpha "
                "or set max_grad_norm")
    return ("likely cause: an overflow in the model's dtype (float16: use bfloat16 or float32) or non-finite weights "
            "in the model as loaded")


def check_weights_finite(pl_module, what: str) -> None:
    """Raise :class:`~dpruner_lightning.export.NonFiniteError` naming the first target weight with NaN / inf."""
    check_finite({n: t.weight for n, t in pl_module.targets.items()}, what, nonfinite_hint(pl_module))


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def all_reduce_sum(trainer: L.Trainer):
    """An in-place sum of a tensor over the trainer's ranks (what :meth:`reduce_across_ranks` receives)."""
    strategy = trainer.strategy

    def reduce_(t: torch.Tensor) -> torch.Tensor:
        out = strategy.reduce(t, reduce_op="sum")
        if out is not t:
            t.copy_(out)
        return t

    return reduce_


_EXIT_HOOK_REGISTERED = False


def _destroy_process_group_at_exit() -> None:
    """Tear the process group down before the interpreter exits: left alive, gloo's worker threads can
    be destroyed while joinable at exit ("terminate called without an active exception", SIGABRT),
    which makes ``ddp_spawn`` report a failed worker after a successful run."""
    global _EXIT_HOOK_REGISTERED
    if _EXIT_HOOK_REGISTERED:
        return
    _EXIT_HOOK_REGISTERED = True

    def destroy() -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)


def check_multi_process(trainer: L.Trainer, pl_module) -> None:
    """Refuse the multi-process setups whose results would not equal one process."""
    if trainer.world_size <= 1:
        return
    _destroy_process_group_at_exit()
    if not isinstance(trainer.strategy, DDPStrategy):
        raise NotImplementedError(
            f"calibration passes on {trainer.world_size} processes support Lightning's DDP strategies only "
            f"(strategy='ddp' or 'ddp_spawn'), not {type(trainer.strategy).__name__}"
        )
    method = pl_module.method
    if not method.multi_process:
        raise NotImplementedError(
            f"{method.name} cannot run on several processes (it replays the calibration batches itself, each "
            f"rank would prune with its own share of them): run it on one device (trainer.devices=1)"
        )


class CalibrationPassCallback(L.Callback):
    def __init__(self, pass_name: str) -> None:
        self.pass_name = pass_name
        self._t0 = 0.0
        self._validation_seconds = 0.0  # Lightning validates inside the epoch: not part of the pass
        self._v0: float | None = None

    def state_dict(self) -> dict:
        return {"pass_name": self.pass_name}

    def _mine(self, module) -> bool:
        return module.current_pass.name == self.pass_name

    def _epochs(self, module) -> list[int]:
        return [i for i, p in enumerate(module.schedule) if p.name == self.pass_name]

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            check_multi_process(trainer, pl_module)
            # One epoch per pass epoch, and a fresh train loader each epoch (general, then domain data).
            trainer.fit_loop.max_epochs = len(pl_module.schedule)
            trainer.reload_dataloaders_every_n_epochs = 1

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        if self._mine(pl_module) and trainer.current_epoch == self._epochs(pl_module)[0]:
            log.info("pass %r: %s", self.pass_name, pl_module.current_pass)
            self._t0 = time.perf_counter()
            self._validation_seconds = 0.0
            pl_module.method.start_pass(pl_module.current_pass)

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._v0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._v0 is not None:
            self._validation_seconds += time.perf_counter() - self._v0
            self._v0 = None

    def on_after_backward(self, trainer: L.Trainer, pl_module) -> None:
        if self._mine(pl_module):
            stats = pl_module.method.after_backward(pl_module.current_pass)
            if stats:
                pl_module.log_dict(stats, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if not (self._mine(pl_module) and trainer.current_epoch == self._epochs(pl_module)[-1]):
            return
        p = pl_module.current_pass
        if trainer.world_size > 1:  # every rank accumulated its own batches: sum them before scoring
            pl_module.method.reduce_across_ranks(p, all_reduce_sum(trainer))
        pl_module.method.end_pass(p)
        seconds = time.perf_counter() - self._t0 - self._validation_seconds
        pl_module.phase_seconds[p.name] = seconds
        # NaN / inf stop the run here, naming the matrix, rather than reach the masks and the exports.
        check_weights_finite(pl_module, f"target weights after pass {p.name!r}")
        artifacts = {k: v for k, v in pl_module.method.artifacts().items() if v}
        for group, tensors in artifacts.items():
            check_finite(tensors, f"{group} after pass {p.name!r}", nonfinite_hint(pl_module))
        writer = tensorboard(trainer)
        if writer is not None:
            writer.add_scalar(f"time/{p.name}_seconds", seconds, trainer.global_step)
            # Only the groups this pass produced: earlier passes' tensors were drawn when they ended.
            artifacts = {k: v for k, v in artifacts.items() if k not in pl_module.histograms_logged}
            pl_module.histograms_logged.update(artifacts)
            for group, tensors in artifacts.items():
                for i, (name, t) in enumerate(tensors.items()):
                    add_histogram(writer, f"{group}/{name}", t, pl_module.output.histogram_samples, i, trainer.current_epoch)


def structured_report(report: dict, pl_module) -> dict:
    """:func:`realised_sparsity`'s report of a structurally pruned model, re-expressed as the fraction of
    the ORIGINAL target / all parameters removed (zeros inside the remaining weights are not counted)."""
    dense = pl_module.dense_parameters
    per_matrix = {n: 1.0 - pl_module.targets[n].numel() / (rows * cols) for n, (rows, cols) in pl_module.dense_shapes.items()}
    return dict(report, per_matrix=per_matrix,
                targets=1.0 - report["target_parameters"] / max(1, dense["targets"]),
                all_parameters=1.0 - report["all_parameter_count"] / max(1, dense["all"]))


class MaskApplication(L.Callback):
    """Apply the masks at the end of fit (unless the module's passes are being run step by step)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        # Refuse an export folder holding the user's files now, not after the calibration passes.
        out, spec = run_dir(trainer), pl_module.output  # run_dir: a collective, on every rank
        if pl_module.apply_masks_at_end:
            for name, wanted in (("pruned_model", spec.export_model), ("sparse_model", spec.export_sparse)):
                if wanted:
                    check_replaceable(out / name)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if pl_module.apply_masks_at_end:
            finalize_pruning(trainer, pl_module)


def finalize_pruning(trainer: L.Trainer, pl_module) -> None:
    """Choose and apply the masks, check the realised sparsity, log it and save the artifacts."""
    t0 = time.perf_counter()
    masks = pl_module.apply_pruning()
    pl_module.phase_seconds["mask"] = time.perf_counter() - t0
    check_weights_finite(pl_module, "target weights after pruning")  # what would be exported
    weights = {n: t.weight_view() for n, t in pl_module.targets.items()}
    report = realised_sparsity(pl_module.model, weights)
    spec, method = pl_module.mask_spec, pl_module.method
    granularity = spec.resolved_granularity(method.default_granularity)
    structured = method.structured
    if structured:  # shapes shrank: "sparsity" = fraction of the original parameters removed
        report = structured_report(report, pl_module)
        granularity = "structured"
    if masks:  # a structured method returns none: nothing to check against
        requested = {n: mask_sparsity(k) for n, k in masks.items()}
        shapes = {n: tuple(k.shape) for n, k in masks.items()}
        check_realised(report["per_matrix"], requested, shapes, "layer", spec.block_size)
        _check_request(report, requested, shapes, spec, granularity, method)
    dense = pl_module.dense_parameters
    pl_module.summary.update(
        method=method.name,
        method_repr=repr(method),
        granularity=granularity,
        allocation=spec.allocation,
        sparsity_target=spec.target_sparsity(method.default_granularity),
        sparsity_realised={"targets": report["targets"], "all_parameters": report["all_parameters"]},
        parameters={"targets": report["target_parameters"], "all": report["all_parameter_count"],
                    "targets_dense": dense.get("targets"), "all_dense": dense.get("all")},
    )
    if structured:
        pl_module.summary["structured"] = dict(method.plan_summary,
                                               reload="dpruner_lightning.algorithms.structured.load_structured_pruned")
    writer = tensorboard(trainer) if trainer is not None else None
    if writer is not None:
        for i, (name, s) in enumerate(report["per_matrix"].items()):
            writer.add_scalar(f"sparsity/{name}", s, 0)
            writer.add_scalar("sparsity/by_target_index", s, i)
        writer.add_scalar("sparsity/targets", report["targets"], 0)
        writer.add_scalar("sparsity/all_parameters", report["all_parameters"], 0)
    if trainer is not None:
        _save_artifacts(trainer, pl_module, masks)
    pl_module.summary["peak_memory_bytes"] = peak_memory_bytes()
    pl_module.summary["seconds"] = dict(pl_module.phase_seconds)
    if trainer is not None:
        RunSummary.write(trainer, pl_module)
    log.info("pruned: %.4f of target weights, %.4f of all parameters are %s", report["targets"],
             report["all_parameters"], "removed" if structured else "zero")


def _check_request(report, requested, shapes, spec, granularity, method) -> None:
    target = spec.target_sparsity(method.default_granularity)
    # A method whose selection rounds differently (SparseGPT floors per column block) says how much.
    tolerance = method.tolerance
    if spec.allocation == "uniform" and granularity != "global":
        off = {n: s for n, s in requested.items() if abs(s - target) > tolerance(shapes[n], granularity, spec.block_size)}
        if off:
            raise RuntimeError(f"masks do not match the requested sparsity {target}: {dict(list(off.items())[:5])}")
    elif abs(report["targets"] - target) > 0.01:
        raise RuntimeError(f"overall target sparsity {report['targets']:.4f} is off the request {target}")


def _save_artifacts(trainer: L.Trainer, pl_module, masks) -> None:
    out, spec = run_dir(trainer), pl_module.output
    if not trainer.is_global_zero:  # every rank holds the same results: rank 0 writes them
        return
    if spec.save_importance:
        for group, tensors in pl_module.method.artifacts().items():
            if tensors:
                save_tensors(out / f"{group}.safetensors", tensors, {"method": pl_module.method.name})
    if spec.save_masks and masks:
        save_tensors(out / "masks.safetensors", masks, {"layout": "out x in, 1 = kept"})
    if spec.export_model:
        export_hf_folder(pl_module.model, pl_module.tokenizer, out / "pruned_model")
        pl_module.summary["pruned_model"] = str(out / "pruned_model")
    if spec.export_sparse and masks:
        save_sparse_model(pl_module.model, list(pl_module.targets), pl_module.tokenizer, out / "sparse_model")
        pl_module.summary["sparse_model"] = str(out / "sparse_model")


class RunSummary(L.Callback):
    """Rewrites ``summary.json`` whenever a validation adds perplexities."""

    @staticmethod
    def write(trainer: L.Trainer, pl_module) -> None:
        out = run_dir(trainer)  # on every rank (a collective), then rank 0 writes
        if not trainer.is_global_zero:
            return
        summary = dict(pl_module.summary)
        summary["perplexity"] = {stage: dict(v) for stage, v in pl_module.perplexities.items()}
        atomic_write_json(out / "summary.json", summary)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        pl_module.summary.setdefault("method", pl_module.method.name)
        RunSummary.write(trainer, pl_module)
