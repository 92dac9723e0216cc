"""Callbacks that drive a pruning method through a Lightning "fit".

* :class:`CalibrationPasses` - the method's passes, one epoch per pass epoch: tells the datamodule which
  calibration set to serve (and hands it the tokenizer), checks the memory estimate before the model is
  loaded, starts each pass, hands every micro-batch's (unscaled) gradients to the method in
  ``on_after_backward``, ends the pass, checks that the target weights and the method's tensors are
  finite (a NaN / inf stops the run, naming the matrix and the likely setting), saves the pass's
  importance at once, and logs its time, peak memory and histograms.
* :class:`MaskApplication` - when training ends: the pruning core (:func:`~dpruner_lightning.pruning.prune`)
  chooses, checks and applies the masks; the sparsity per matrix and figures (sparsity and importance
  kept per block and module kind; D-PRUNER's G against S) go to TensorBoard; masks, remaining importance
  and exports are written (export folders holding files we did not write are
  refused when fit starts, before any pass).
* :class:`RunSummary` - owns the run folder (:mod:`~dpruner_lightning.rundir`): claims it, keeps
  ``summary.json`` and its ``status`` up to date, records failures, releases the lock.

Artifacts are saved explicitly: ``ModelCheckpoint`` never fires when ``global_step`` stays 0.

Several processes, DDP: at the end of each pass the method's accumulators are summed across ranks
(:meth:`PruningMethod.reduce_across_ranks`, given an in-place all-reduce-sum built on
``trainer.strategy.reduce``) before :meth:`end_pass`, so every rank computes the same scores and masks.
FSDP2 (``ModelParallelStrategy``, :mod:`~dpruner_lightning.fsdp`): every rank reads every micro-batch and
keeps its own rows; what is saved is gathered first. Artifacts and ``summary.json`` are written by rank 0
only. Other strategies (DeepSpeed, FSDP1) and methods with ``multi_process = False`` (SparseGPT) raise
``NotImplementedError``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from . import models
from .estimate import check_fits, estimate_memory
from .export import atomic_write_json, check_finite, check_replaceable
from .figures import plotting_available
from .fsdp import ModelParallelStrategy, gathered_artifacts, unsharded_copy
from .memory import PeakMemory
from .pruning import check_mask_shapes, check_weights_finite, save_artifacts, save_importance
from .run_figures import importance_before, log_pruning
from .rundir import claim_run_dir, release_lock

log = logging.getLogger(__name__)


#: Where a run without a logger writes when the Trainer's root is the current directory: artifacts
#: never land loose in the directory the user happens to be in.
UNLOGGED = Path("runs") / "unlogged"


def run_dir(trainer: L.Trainer) -> Path:
    """The run's folder: the logger's directory, else ``default_root_dir`` unless that is the current
    directory (Lightning's default), then ``runs/unlogged`` under it. ``trainer.log_dir`` is a
    collective (a broadcast) on several processes: call this on EVERY rank, and only then skip the
    writing on ranks other than 0."""
    out = Path(trainer.log_dir or trainer.default_root_dir)
    if out.resolve() == Path.cwd().resolve():  # no logger (or fast_dev_run's dummy one) and no root given
        out = out / UNLOGGED
    return out


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


def all_reduce_sum(trainer: L.Trainer):
    """An in-place sum of a tensor over the trainer's ranks (what :meth:`reduce_across_ranks` receives)."""
    strategy = trainer.strategy

    def reduce_(t: torch.Tensor) -> torch.Tensor:
        out = strategy.reduce(t, reduce_op="sum")
        if out is not t:
            t.copy_(out)
        return t

    return reduce_


def check_multi_process(trainer: L.Trainer, pl_module) -> None:
    """Refuse the multi-process setups whose results would not equal one process."""
    if trainer.world_size <= 1:
        return
    if isinstance(trainer.strategy, ModelParallelStrategy):
        return  # FSDP2: the method refuses what it cannot shard when the model is sharded (prepare)
    if not isinstance(trainer.strategy, DDPStrategy):
        raise NotImplementedError(
            f"calibration passes on {trainer.world_size} processes support Lightning's DDP strategies "
            f"(strategy='ddp' or 'ddp_spawn') and FSDP2 through ModelParallelStrategy (data_parallel_size = "
            f"processes, tensor_parallel_size 1), not {type(trainer.strategy).__name__}"
        )
    method = pl_module.method
    if not method.multi_process:
        raise NotImplementedError(
            f"{method.name} cannot run on several processes (it replays the calibration batches itself, each "
            f"rank would prune with its own share of them): run it on one device (trainer.devices=1)"
        )


def _release_process_group(trainer: L.Trainer) -> None:
    """A spawned DDP worker ends right after its stage: tear its process group down first. Left alive,
    gloo's threads can be destroyed while joinable at interpreter exit ("terminate called without an
    active exception", SIGABRT), and ``ddp_spawn`` then reports a failed worker after a good run."""
    spawned = getattr(trainer.strategy, "_start_method", None) in ("spawn", "fork", "forkserver")
    if spawned and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_schedule(trainer: L.Trainer, pl_module) -> None:
    """The Trainer must run one epoch per pass epoch and reload the train loader each epoch."""
    want = pl_module.trainer_kwargs()
    have = {"max_epochs": trainer.max_epochs, "reload_dataloaders_every_n_epochs": trainer.reload_dataloaders_every_n_epochs}
    if have != want:
        raise ValueError(f"this Trainer runs {have}, the method's passes need {want}: build it with "
                         "L.Trainer(**module.trainer_kwargs(), ...) or call module.configure_trainer(trainer) before fit")


def active_loss_scaler(trainer: L.Trainer):
    """The precision plugin's loss scaler when one is enabled (``16-mixed``), else None."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def unscale_gradients(trainer: L.Trainer, pl_module) -> bool:
    """Under ``16-mixed`` Lightning scales the loss in ``manual_backward`` and unscales only when an
    optimizer steps: divide the target gradients by the scale before any method reads them (the scale
    would otherwise enter G, S and the step). A non-finite gradient means the scale overflowed: the
    micro-batch is dropped (gradients cleared) and the scale backed off. Returns whether to go on."""
    scaler = active_loss_scaler(trainer)
    if scaler is None:
        return True
    scale = float(scaler.get_scale())
    grads = [t.weight.grad for t in pl_module.targets.values() if t.weight.grad is not None]
    for g in grads:
        g.div_(scale)
    if not grads or bool(torch.isfinite(torch.stack([g.sum().float() for g in grads])).all()):  # one host sync
        return True
    log.warning("fp16 loss scale %g overflowed: micro-batch skipped, scale lowered", scale)
    scaler.update(new_scale=scale * scaler.get_backoff_factor())
    for t in pl_module.targets.values():
        t.weight.grad = None
    return False


def gradients_final_in_backward(trainer: L.Trainer) -> bool:
    """One unsharded process and no loss scaler: a target gradient is final as soon as autograd has computed
    it (no all-reduce, unscaling or overflow check comes after), so a method may consume it right there."""
    return (trainer.world_size == 1 and not isinstance(trainer.strategy, ModelParallelStrategy)
            and active_loss_scaler(trainer) is None)


class CalibrationPasses(L.Callback):
    """Drives the method's passes: tells the datamodule which calibration set to serve, starts each
    pass, hands every micro-batch's gradients to the method, ends the pass (summing accumulators over
    ranks first), checks weights and scores are finite, saves the pass's importance at once (so an
    interruption of a later pass keeps it), and logs time, peak memory and histograms."""

    def __init__(self) -> None:
        self._t0 = 0.0
        self._validation_seconds = 0.0  # Lightning validates inside the epoch: not part of the pass
        self._v0: float | None = None
        self._memory: PeakMemory | None = None
        self._drawn: set[str] = set()  # artifact groups already drawn in TensorBoard

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "use_tokenizer"):
            models.check_seq_len(pl_module.model_spec, datamodule.seq_len)  # before any tokenising
            datamodule.use_tokenizer(pl_module.tokenizer)
            datamodule.prepare_blocks()  # too-short text fails now, before the model is loaded
        if stage != "fit":
            return
        check_multi_process(trainer, pl_module)
        check_schedule(trainer, pl_module)
        pl_module.method.gradients_final_in_backward = gradients_final_in_backward(trainer)  # before the estimate
        if datamodule is not None and hasattr(datamodule, "batch_size") and pl_module.model is None:
            estimate = estimate_memory(pl_module.model_spec, pl_module.method, pl_module.target_spec,
                                       datamodule.batch_size, datamodule.seq_len)
            check_fits(estimate, trainer.strategy.root_device, f"{pl_module.method.name} on {pl_module.model_spec.name_or_path}")
        self._serve(trainer, pl_module, 0)

    @staticmethod
    def _serve(trainer: L.Trainer, pl_module, epoch: int) -> None:
        """Lightning requests an epoch's train loader before ``on_train_epoch_start``: say the source first."""
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "serve") and epoch < len(pl_module.schedule):
            # FSDP (sharded in configure_model, after this first call): every rank reads every micro-batch
            fsdp = isinstance(trainer.strategy, ModelParallelStrategy)
            datamodule.serve(pl_module.schedule[epoch].source, every_rank_reads_all=fsdp)

    @staticmethod
    def _first_and_last(pl_module, epoch: int) -> tuple[bool, bool]:
        schedule = pl_module.schedule
        name = schedule[epoch].name
        return (epoch == 0 or schedule[epoch - 1].name != name,
                epoch == len(schedule) - 1 or schedule[epoch + 1].name != name)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module) -> None:
        if self._first_and_last(pl_module, trainer.current_epoch)[0]:
            p = pl_module.current_pass
            log.info("pass %r: %s", p.name, p)
            self._memory = PeakMemory().start()
            self._t0 = time.perf_counter()
            self._validation_seconds = 0.0
            pl_module.method.start_pass(p)

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._v0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._v0 is not None:
            self._validation_seconds += time.perf_counter() - self._v0
            self._v0 = None

    def on_after_backward(self, trainer: L.Trainer, pl_module) -> None:
        if not unscale_gradients(trainer, pl_module):
            return  # an overflowed fp16 micro-batch: skipped, as the loss scaler would skip its step
        stats = pl_module.method.after_backward(pl_module.current_pass)
        if stats:
            pl_module.log_dict(stats, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        self._serve(trainer, pl_module, epoch + 1)
        if not self._first_and_last(pl_module, epoch)[1]:
            return
        p = pl_module.current_pass
        if trainer.world_size > 1 and not pl_module.method.sharded:  # DDP: each rank its own batches: sum them
            pl_module.method.reduce_across_ranks(p, all_reduce_sum(trainer))
        pl_module.method.end_pass(p)
        seconds = time.perf_counter() - self._t0 - self._validation_seconds
        pl_module.phase_seconds[p.name] = seconds
        if self._memory is not None:
            self._memory.stop()
            pl_module.peak_memory[p.name], pl_module.peak_memory_kind = self._memory.peak_bytes, self._memory.kind
        # NaN / inf stop the run here, naming the matrix, rather than reach the masks and the exports.
        hint = pl_module.nonfinite_hint()
        check_weights_finite(pl_module.targets, f"target weights after pass {p.name!r}", hint)
        artifacts = {k: v for k, v in pl_module.method.artifacts().items() if v}
        for group, tensors in artifacts.items():
            check_finite(tensors, f"{group} after pass {p.name!r}", hint)
        new = {k: v for k, v in artifacts.items() if k not in self._drawn}  # what this pass produced
        self._drawn.update(new)
        out = run_dir(trainer)  # a collective: on every rank
        if pl_module.output.save_importance and new:
            whole = gathered_artifacts(pl_module.method, new)  # FSDP: a collective, on every rank
            if trainer.is_global_zero:
                pl_module.artifacts.update(save_importance(out, pl_module.method, new, artifacts=whole))
        writer = tensorboard(trainer)
        if writer is not None:
            writer.add_scalar(f"time/{p.name}_seconds", seconds, trainer.global_step)
            for group, tensors in new.items():
                for i, (name, t) in enumerate(tensors.items()):
                    add_histogram(writer, f"{group}/{name}", t, pl_module.output.histogram_samples, i, epoch)

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        _release_process_group(trainer)


class MaskApplication(L.Callback):
    """At the end of fit (unless the passes are being run step by step): choose, check and apply the
    masks with the pruning core, log the sparsity per matrix, and save the artifacts (rank 0)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        check_mask_shapes(pl_module.targets, pl_module.mask_spec, pl_module.method)  # before any pass
        # Refuse an export folder holding the user's files now, not after the calibration passes.
        out, spec = run_dir(trainer), pl_module.output  # run_dir: a collective, on every rank
        if pl_module.apply_masks_at_end:
            for name, wanted in (("pruned_model", spec.export_model), ("sparse_model", spec.export_sparse),
                                 ("compressed_24_model", spec.export_compressed_24)):
                if wanted:
                    check_replaceable(out / name)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not pl_module.apply_masks_at_end:
            return
        # The figures are rank 0's (the other ranks' loggers drop what they are given).
        writer = tensorboard(trainer) if trainer.is_global_zero else None
        draw = writer is not None and plotting_available()
        sharded = pl_module.method.sharded  # FSDP: rank 0 holds only its rows of the scores: no importance figures
        totals = importance_before(pl_module.method) if draw and not sharded else None  # before the masks zero any weight
        with PeakMemory() as memory:
            result = pl_module.apply_pruning()
        pl_module.phase_seconds["mask"] = result.seconds
        pl_module.peak_memory["mask"], pl_module.peak_memory_kind = memory.peak_bytes, memory.kind
        if writer is not None:
            log_pruning(writer, result, None if sharded else pl_module.method, totals)  # before release()
        out = run_dir(trainer)
        model, spec, whole = pl_module.model, pl_module.output, None
        if pl_module.method.sharded:  # gathered on every rank (collectives), written by rank 0
            whole = gathered_artifacts(pl_module.method) if spec.save_importance else {}
            if spec.export_model or spec.export_sparse or spec.export_compressed_24:
                model = unsharded_copy(pl_module.model, trainer.global_rank)
        if trainer.is_global_zero:  # every rank holds the same results: rank 0 writes them
            pl_module.artifacts.update(save_artifacts(out, result, model, pl_module.tokenizer, pl_module.method,
                                                      spec, written_before=pl_module.artifacts, artifacts=whole))
        pl_module.method.release()  # W0 copies, collected batches: not needed past this point
        RunSummary.write(trainer, pl_module, "complete")


class RunSummary(L.Callback):
    """Owns the run folder (see :mod:`~dpruner_lightning.rundir`): claims it when a stage starts,
    keeps ``summary.json`` up to date with a ``status``, records failures, and releases the lock."""

    @staticmethod
    def write(trainer: L.Trainer, pl_module, status: str, **extra) -> None:
        out = run_dir(trainer)  # on every rank (a collective), then rank 0 writes
        if trainer.is_global_zero:
            atomic_write_json(out / "summary.json", {**pl_module.run_summary(), "status": status, **extra})

    def __init__(self) -> None:
        self._memory = PeakMemory()  # of a validate stage (a validation inside fit belongs to the pass)

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        out = run_dir(trainer)  # a collective: on every rank
        if trainer.is_global_zero:
            claim_run_dir(out, pl_module.output.overwrite)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not pl_module.apply_masks_at_end:  # passes run step by step: this one is done
            RunSummary.write(trainer, pl_module, "complete", stage="fit")

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        RunSummary.write(trainer, pl_module, "running", stage="fit")

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "eval_names"):
            pl_module.eval_names = tuple(datamodule.eval_names)  # which set each loader holds, in order
        if trainer.state.fn != "fit":  # a validation inside fit is part of the fit stage
            self._memory.start()
            RunSummary.write(trainer, pl_module, "running", stage="validate")

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn == "fit":
            return
        self._memory.stop()
        pl_module.peak_memory[f"validate_{pl_module.stage}"] = self._memory.peak_bytes
        pl_module.peak_memory_kind = self._memory.kind
        RunSummary.write(trainer, pl_module, "complete")

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        if not trainer.is_global_zero:
            return
        try:  # no collective here: the other ranks may not have failed
            out = Path(trainer.logger.log_dir) if trainer.logger is not None else run_dir(trainer)  # no broadcast without a logger
            summary = {**pl_module.run_summary(), "status": status, "error": f"{type(exception).__name__}: {exception}"}
            atomic_write_json(out / "summary.json", summary)
            release_lock(out)
        except Exception:  # the original error matters more than a summary we could not write
            log.exception("could not record the %s run in summary.json", status)

    def teardown(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        out = run_dir(trainer)  # a collective: on every rank
        if trainer.is_global_zero:
            release_lock(out)
