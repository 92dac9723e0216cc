"""The LightningModule: an HF causal LM whose "fit" epochs are calibration passes of a pruning method.

Epochs map onto the method's passes (D-PRUNER: epoch 0 = general importance on open-domain data,
epochs 1.. = the regularised dual pass on domain data); the callbacks of :mod:`callbacks` call the
method's hooks, and the masks are applied when training ends. ``validate`` reports the perplexity of
whatever weights the module holds, logged as ``ppl/<eval set>_<stage>`` with stage ``dense`` (before
any weight changed), ``loaded`` (instead of ``dense`` when the model as loaded already has over 1% zeros
in its targets, e.g. a pruned folder), ``tuned`` (after an SGD pass) or ``pruned``.

Gradients. The target weights require grad for the whole ``fit`` (DDP needs parameters that require
grad when it wraps the module) and nothing else does; passes that need no gradient run their forward
under ``torch.no_grad()``, so no graph is built and memory is as before. After ``fit`` nothing requires
grad.

Several processes (Lightning's DDP strategies, ``ddp`` / ``ddp_spawn``): each rank runs its share of the
calibration batches (Lightning's ``DistributedSampler``, no shuffle: rank r gets sequences r, r+N, ...).
Every training step runs inside the DDP wrapper's ``no_sync()``: DDP would otherwise average the
gradients during backward, and squares of that mean are not sums of per-micro-batch squares. The
methods' accumulators are summed across ranks at the end of each pass (see
:meth:`PruningMethod.reduce_across_ranks`), and an ``sgd`` pass averages the target gradients over
ranks by hand before ``opt.step()``, so every rank applies the same update. With ``ddp_spawn`` the
calling process only gets rank 0's weights back: read the results from the artifacts.
"""

from __future__ import annotations

import logging
import math
from contextlib import ExitStack
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import SumMetric

from .algorithms.sharding import shard_model
from .algorithms.targets import Target, find_decoder_blocks, find_targets
from .callbacks import CalibrationPasses, MaskApplication, RunSummary
from .config import MaskSpec, ModelSpec, OutputSpec, TargetSpec
from .export import NonFiniteError
from .fsdp import fsdp_mesh
from .methods.base import CalibrationPass, PruningMethod
from .methods.dpruner import DPrunerMethod
from .models import check_model_source, load_causal_lm, load_tokenizer
from .pruning import DenseReference, PruneResult, calibration_step, check_weights_finite, load_saved_importance, nonfinite_hint, prune

log = logging.getLogger(__name__)


class DPrunerModule(L.LightningModule):
    def __init__(
        self,
        model: ModelSpec = ModelSpec(),
        method: Optional[PruningMethod] = None,
        mask: MaskSpec = MaskSpec(),
        targets: TargetSpec = TargetSpec(),
        output: OutputSpec = OutputSpec(),
        resume_from: Optional[str] = None,
    ) -> None:
        """
        Args:
            model: which causal LM to load and how.
            method: the pruning method (default: D-PRUNER with its default hyperparameters).
            mask: sparsity, granularity and layer-wise allocation of the masks.
            targets: regexes selecting the pruned weight matrices.
            output: what the run writes to its log directory.
            resume_from: the folder of an earlier run of the same model whose saved importance is reused
                instead of recomputed (D-PRUNER: G if the general estimator is the same, S if every
                setting is); the passes it replaces are skipped.
        """
        super().__init__()
        check_model_source(model)  # fail before the datamodule tokenises anything
        self.model_spec = model
        self.method = method if method is not None else DPrunerMethod()
        self.method.check_mask_spec(mask)  # methods that honour only some mask settings reject the rest now
        output.check_mask(mask.resolved_granularity(self.method.default_granularity), self.method.structured)
        self.mask_spec = mask
        self.target_spec = targets
        self.output = output
        self.eval_names: tuple[str, ...] = ("domain", "general")
        self.save_hyperparameters(ignore=["method"])
        self.automatic_optimization = False  # passes call backward / step themselves (pruning.calibration_step)
        self.model: Optional[torch.nn.Module] = None
        self.targets: dict[str, Target] = {}
        #: Passes replaced by importance loaded from ``resume_from``.
        self.resumed: list[str] = load_saved_importance(self.method, resume_from) if resume_from else []
        self.schedule: list[CalibrationPass] = self._plan(None)
        self.apply_masks_at_end = True
        #: ``dense`` (weights as loaded), ``loaded`` (as loaded, but already over 1% zeros in the targets),
        #: ``tuned`` (after an SGD pass) or ``pruned``.
        self.stage = "dense"
        #: What the run produced (read by the summary, ``compare`` and the API; written by the callbacks).
        self.result: Optional[PruneResult] = None
        self.perplexities: dict[str, dict[str, float]] = {}  # stage -> eval set -> perplexity
        self.phase_seconds: dict[str, float] = {}
        self.peak_memory: dict[str, int] = {}  # phase -> peak bytes (see memory.PeakMemory)
        self.peak_memory_kind = "unknown"
        self.artifacts: dict[str, str] = {}  # artifact -> path written
        #: The model as loaded (set with the model).
        self.dense: Optional[DenseReference] = None
        self._tokenizer = None
        self._fp32_buffers: dict[str, torch.Tensor] = {}
        self._nll = torch.nn.ModuleList()
        self._tokens = torch.nn.ModuleList()
        self._no_sync = ExitStack()

    # -- model ------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_spec)
        return self._tokenizer

    def configure_model(self) -> None:
        if self.model is None:  # idempotent: fit, validate and the API call it again
            self.load_model()
        mesh = fsdp_mesh(self._trainer, self)
        if mesh is not None and not self.method.sharded:  # FSDP2: one fully_shard per decoder block, then the root
            shard_model(self.model, find_decoder_blocks(self.model)[1], mesh)
            self.method.prepare(self.model, self.targets)  # now on this rank's rows
        # Targets require grad for the whole fit (DDP, which wraps the module right after this hook,
        # needs some); validate / predict need none. on_fit_end turns them off again.
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        self._targets_require_grad(fitting)

    def _targets_require_grad(self, flag: bool) -> None:
        for t in self.targets.values():
            t.weight.requires_grad_(flag)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # ddp_spawn hands rank 0's weights back to the calling process, whose model may never have been loaded.
        if self.model is None and any(k.startswith("model.") for k in state_dict):
            self.load_model()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def load_model(self) -> None:
        """(Re)load the model from its spec: targets, dense reference and stage, then ``method.prepare``
        (:meth:`configure_model` calls it once; re-pruning a structured method reloads the dense model)."""
        self.model = load_causal_lm(self.model_spec)
        self.model.requires_grad_(False)
        self.targets = find_targets(self.model, self.target_spec.target_modules, self.target_spec.exclude_modules)
        self.dense = DenseReference.of(self.model, self.targets)
        zeros = sum(int((t.weight == 0).sum()) for t in self.targets.values()) / max(1, self.dense.parameters["targets"])
        if zeros > 0.01 and self.stage == "dense":  # e.g. `dpruner validate` on a pruned folder: not "dense"
            self.stage = "loaded"
            log.info("the model as loaded is already %.1f%% sparse in its targets: its perplexity is reported as "
                     "stage 'loaded'", 100 * zeros)
        # Rotary inv_freq must stay fp32 even under `bf16-true`, which casts every buffer.
        self._fp32_buffers = {n: b.detach().clone() for n, b in self.model.named_buffers() if "inv_freq" in n}
        self.method.prepare(self.model, self.targets)
        log.info("loaded %s: %d target matrices", self.model_spec.name_or_path, len(self.targets))

    def _restore_fp32_buffers(self) -> None:
        for name, saved in self._fp32_buffers.items():
            owner, _, attr = name.rpartition(".")
            module = self.model.get_submodule(owner) if owner else self.model
            setattr(module, attr, saved.to(next(self.model.parameters()).device))

    def on_fit_start(self) -> None:
        self._restore_fp32_buffers()
        # one process (or FSDP, whose ranks all see each micro-batch): a method may step in after_backward
        self.method.world_size = 1 if self.method.sharded else self.trainer.world_size
        self.method.step_stats = bool(self.trainer.loggers)  # per-step statistics only when something logs them

    def on_fit_end(self) -> None:
        self._targets_require_grad(False)

    def on_validation_start(self) -> None:
        self._restore_fp32_buffers()

    # -- calibration passes -----------------------------------------------------------------------
    def configure_callbacks(self):
        return [CalibrationPasses(), MaskApplication(), RunSummary()]

    def trainer_kwargs(self) -> dict:
        """What a ``Trainer`` running this module's ``fit`` needs: one epoch per pass epoch, and a fresh
        train loader each epoch (open-domain, then domain data): ``L.Trainer(**module.trainer_kwargs(), ...)``."""
        return {"max_epochs": len(self.schedule), "reload_dataloaders_every_n_epochs": 1}

    def configure_trainer(self, trainer: L.Trainer) -> None:
        """Set :meth:`trainer_kwargs` on an existing ``trainer`` before its ``fit`` (the CLI, ``compare``)."""
        kwargs = self.trainer_kwargs()
        trainer.fit_loop.max_epochs = kwargs["max_epochs"]
        trainer.reload_dataloaders_every_n_epochs = kwargs["reload_dataloaders_every_n_epochs"]

    def select_passes(self, names: Optional[list[str]] = None, apply_masks: bool = True) -> None:
        """Run only the named passes in the next ``fit`` (the step-by-step API); ``None`` = all of them."""
        passes = self.method.passes()
        unknown = set(names or ()) - {p.name for p in passes}
        if unknown:
            raise ValueError(f"unknown pass {sorted(unknown)}; {self.method.name} has {[p.name for p in passes]}")
        self.schedule = self._plan(names)
        self.apply_masks_at_end = apply_masks

    def _plan(self, names: Optional[list[str]]) -> list[CalibrationPass]:
        """One entry per epoch of every pass to run (at least one epoch: fit needs one to end)."""
        todo = [p for p in self.method.passes() if (names is None or p.name in names) and p.name not in self.resumed]
        return [p for p in todo for _ in range(p.epochs)] or [CalibrationPass("resumed", "general", "none")]

    @property
    def current_pass(self) -> CalibrationPass:
        epoch = self.trainer.current_epoch if self._trainer is not None else 0
        return self.schedule[min(epoch, len(self.schedule) - 1)]

    def configure_optimizers(self):
        # Steps are the method's (sgd_step: fp32 masters for 16-bit weights); this plain SGD (no state,
        # lr = the method's) only gives Lightning its bookkeeping and zero_grad.
        return torch.optim.SGD([t.weight for t in self.targets.values()], lr=self.method.learning_rate, momentum=0.0)

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self.method.log_this_step = self._logger_writes_this_step()
        # DDP: keep gradients local. training_step runs inside the wrapper's forward, so no_sync() must
        # be entered before it (and its backward happens inside it too).
        ddp = self.trainer.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            self._no_sync.enter_context(ddp.no_sync())

    def _logger_writes_this_step(self) -> bool:
        """Whether the logger writes the coming step's metrics (every ``log_every_n_steps``): the per-step
        statistics cost passes over every weight, so they are computed only then. Lightning's own answer
        (a private attribute) when it has one, else every step."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self._no_sync.close()

    def training_step(self, batch: dict, batch_idx: int) -> None:
        p = self.current_pass
        input_ids = batch["input_ids"]
        # manual_backward: the callbacks' on_after_backward hand the gradients to the method.
        loss = calibration_step(self.model, self.method, p, input_ids, backward=self.manual_backward)
        if loss is None:
            return None
        if p.mode == "sgd" and self.method.learning_rate > 0:
            self._average_gradients_across_ranks()
            self.method.sgd_step(p)  # clipping, if any, happened in after_backward (the method's own order)
            self.stage = "tuned"
        self.optimizers().zero_grad(set_to_none=True)
        self.log(f"loss/{p.name}", loss.detach(), on_step=True, prog_bar=True, batch_size=input_ids.shape[0])
        return None

    @torch.no_grad()
    def _average_gradients_across_ranks(self) -> None:
        """Several processes: replace every target's local step gradient by its mean over ranks (by hand,
        since the backward ran under no_sync()), so all ranks take the same SGD step."""
        world = self.trainer.world_size
        if world <= 1 or self.method.sharded:  # FSDP averaged identical gradients: nothing to do
            return
        for t in self.targets.values():
            if t.weight.grad is not None:
                grad = t.weight.grad
                reduced = self.trainer.strategy.reduce(grad, reduce_op="sum")
                if reduced is not grad:
                    grad.copy_(reduced)
                grad.div_(world)

    # -- perplexity -------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        # eval_names: which evaluation sets the loaders hold, in order (set by RunSummary from the datamodule).
        needed = max(1, len(self.eval_names))
        while len(self._nll) < needed:
            # "disable": NaN / inf stay in the sum (the default drops NaNs with a warning, which turned a
            # diverged model into perplexity 1.0); on_validation_epoch_end refuses a non-finite result.
            self._nll.append(SumMetric(nan_strategy="disable").to(self.device))
            self._tokens.append(SumMetric(nan_strategy="disable").to(self.device))
        for m in list(self._nll) + list(self._tokens):
            m.reset()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        input_ids = batch["input_ids"]
        logits = self.model(input_ids=input_ids, use_cache=False).logits[:, :-1]
        labels = input_ids[:, 1:]
        # Token-weighted sum of cross-entropy plus a count: exact corpus perplexity, no [B*T, V] probs.
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="sum")
        self._nll[dataloader_idx].update(nll)
        self._tokens[dataloader_idx].update(torch.tensor(float(labels.numel()), device=nll.device))

    def on_validation_epoch_end(self) -> None:
        results = {}
        for i, name in enumerate(self.eval_names[: len(self._nll)]):
            count = float(self._tokens[i].compute())
            if count == 0:
                continue
            mean_nll = float(self._nll[i].compute()) / count
            ppl = math.exp(mean_nll) if mean_nll < 700 else math.inf  # exp() overflows past ~709
            if not math.isfinite(ppl):
                self._non_finite_perplexity(name, mean_nll)
            results[name] = ppl
            self.log(f"ppl/{name}_{self.stage}", ppl, sync_dist=False)
        self.perplexities[self.stage] = results
        if self.stage == "pruned" and results:  # TensorBoard's hparams view: the pruned model's perplexity
            self.log("hp_metric", results.get("domain", next(iter(results.values()))), sync_dist=False)

    def _non_finite_perplexity(self, name: str, mean_nll: float) -> None:
        """A NaN / inf perplexity fails the stage: it is never logged, dropped or written to the summary."""
        where = f"on eval set {name!r} at stage {self.stage!r}"
        hint = self.nonfinite_hint()
        check_weights_finite(self.targets, f"perplexity {where} is not finite; target weights", hint)  # names the matrix
        raise NonFiniteError(f"perplexity {where} is not finite (mean NLL per token = {mean_nll}): the model's "
                             f"outputs are NaN / inf or overflow; {hint}")

    def nonfinite_hint(self) -> str:
        return nonfinite_hint(self.method, weights_changed=self.stage not in ("dense", "loaded"))

    # -- pruning ----------------------------------------------------------------------------------
    @property
    def pruned(self) -> bool:
        return self.result is not None

    def apply_pruning(self, spec: Optional[MaskSpec] = None) -> PruneResult:
        """Choose, check and apply the masks with the pruning core (:func:`~dpruner_lightning.pruning.prune`)
        under ``spec`` (default: the module's); called by the mask callback at the end of fit."""
        self.result = prune(self.model, self.targets, self.method, spec or self.mask_spec, self.dense,
                            weights_changed=self.stage not in ("dense", "loaded"))
        self.stage = "pruned"
        return self.result

    def run_summary(self) -> dict:
        """What ``summary.json`` reports: the prune result, perplexities, seconds, peak memory, artifacts."""
        summary = {"method": self.method.name} if self.result is None else self.result.summary()
        summary["perplexity"] = {stage: dict(v) for stage, v in self.perplexities.items()}
        summary["seconds"] = dict(self.phase_seconds)
        if self.peak_memory:
            summary.update(peak_memory_bytes=max(self.peak_memory.values()), peak_memory_kind=self.peak_memory_kind,
                           peak_memory_by_phase=dict(self.peak_memory))
        summary.update(self.artifacts)
        return summary
