"""D-PRUNER (Zhang et al., NAACL 2024, arXiv:2405.06275): dual importance, general + domain.

Pass 1 (open-domain data): general importance G, ``taylor`` or ``obs`` estimator, divided by one
global scalar so its mean is 1. Pass 2 (domain data, ``dual_epochs`` epochs): plain SGD at learning
rate ``alpha`` on ``L_next + lambda_reg * sum G (W - W0)^2`` with ``S += |g*W + 0.5*(g*W)^2|`` after
every micro-batch (g: the regularised gradient, never clipped). Masks come from S and are
applied to the original weights W0 (the fine-tuned weights are dropped unless
``keep_updated_weights``). Only target weights are updated; everything else stays frozen.

Beyond the paper (off by default): ``reconstruct`` re-solves the kept weights for the chosen masks,
block by block, on a domain / open-domain / mixed Hessian (see :mod:`..algorithms.reconstruct`), and
``selection: sequential`` chooses the masks inside that solve, scoring each weight by SparseGPT's OBS
saliency times a power of its dual importance.

Stability. Explicit SGD on the quadratic regulariser multiplies ``W - W0`` by ``1 - 2*alpha*lambda*G``
every step, which diverges wherever ``2*alpha*lambda*G > 2``. The OBS saliency is heavy-tailed (its
maximum can be many orders of magnitude above its median; the README gives a measured case), so even
with the healthcare preset's alpha = 3e-4 and lambda = 0.1 a few weights can blow up, and with them the
whole dual pass.
The default ``update="proximal"`` takes the regulariser implicitly:
``W' = (W - alpha*g_task + 2*alpha*lambda*G*W0) / (1 + 2*alpha*lambda*G)``, i.e. the SGD step with the
gradient divided elementwise by ``1 + 2*alpha*lambda*G``. It is unconditionally stable and equals
plain SGD to first order wherever ``2*alpha*lambda*G`` is small (virtually every weight). S is
always accumulated from the undivided gradient of ``L_ours``. ``update="sgd"`` is plain SGD.

Several processes (DDP, N ranks). General pass: every rank sums its own micro-batches (Taylor sums
and count, or the OBS input Hessian) and :meth:`reduce_across_ranks` totals them: the same as one
process. Dual pass: each rank adds the S terms of its own micro-batch, from its LOCAL regularised
gradient (the backward runs under DDP's ``no_sync()``), and S is summed across ranks at the end; the
module then averages the step gradients over ranks by hand before the SGD step, so every rank applies
the same update and the weights stay identical. One step on N ranks is therefore one process with
gradient accumulation over N micro-batches at the same weights (S gets N terms, the step uses their
mean gradient), not N sequential steps.

Memory and speed. ``state_device: cpu`` keeps the Taylor sums (or OBS Hessians), G, S, W0 and the fp32
masters in host memory and runs the per-step arithmetic there (see :mod:`.base`). Gradients are freed as
soon as they are used: each general-pass gradient once added to the Taylor sums, each dual-pass gradient
once its step is applied; on one unsharded process without a loss scaler that happens in a hook the
moment autograd has computed it (:meth:`~.base.PruningMethod.hook_gradients`), so about one gradient
exists at a time. ``kernels: compiled`` runs each matrix's per-step update as one fused kernel
(:mod:`..algorithms.fused`).
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

import torch

from ..algorithms.hessian import InputStatistics, obs_saliency
from ..algorithms.importance import TaylorState, normalise_mean_, taylor_all_reduce_, taylor_score
from ..algorithms.sharding import local_rows
from ..config import MaskSpec
from .base import CalibrationPass
from .dpruner_steps import DPrunerSteps
from .sparsegpt import check_sequential_mask_spec, prune_sequentially, sequential_tolerance

log = logging.getLogger(__name__)


class DPrunerMethod(DPrunerSteps):
    name = "d_pruner"
    default_granularity = "layer"

    def __init__(
        self,
        general_estimator: Literal["taylor", "obs"] = "taylor",
        lambda_reg: float = 0.1,
        alpha: float = 3e-4,
        dual_epochs: int = 1,
        max_grad_norm: Optional[float] = None,
        keep_updated_weights: bool = False,
        damp: float = 0.01,
        update: Literal["proximal", "sgd"] = "proximal",
        reconstruct: Literal["none", "obs", "exact"] = "none",
        hessian_mix: float = 0.0,
        selection: Literal["score", "sequential"] = "score",
        dual_exponent: float = 1.0,
        state_device: Literal["auto", "cpu"] = "auto",
        kernels: Literal["auto", "eager", "compiled"] = "auto",
        general_dtype: Literal["float32", "weights"] = "float32",
    ) -> None:
        """
        Args:
            general_estimator: ``taylor`` (gradient + empirical Fisher, the paper's second-order Taylor term) or ``obs``
                (SparseGPT's OBS saliency W^2 / diag(H^-1 chol)^2, what the paper's experiments used).
            lambda_reg: strength of the general-importance regulariser (G has mean 1).
            alpha: SGD learning rate of the dual pass (0: no update, S is a plain domain Taylor score).
            dual_epochs: epochs over the domain calibration set.
            max_grad_norm: clip the total gradient norm of each SGD step (S uses the unclipped gradient).
            keep_updated_weights: apply the masks to the fine-tuned weights instead of the originals.
            damp: OBS dampening, a fraction of mean(diag H).
            update: ``proximal`` (the regulariser taken implicitly: stable for any G) or ``sgd`` (plain SGD).
            reconstruct: after the masks, re-solve the kept weights block by block (``obs``: SparseGPT's
                update for the given mask, ``exact``: per-row least squares); ``none`` is the paper.
            hessian_mix: open-domain share of the reconstruction Hessian (0: domain only).
            selection: ``score`` (the paper: masks from S by ``mask.granularity``) or ``sequential``
                (masks chosen inside the block-by-block OBS solve, per 128-column block or N:M, by the
                OBS saliency ``w^2/d^2`` times ``(S / mean S)^dual_exponent``; needs ``reconstruct``
                ``obs`` (SparseGPT's update) or ``exact`` (then the exact least-squares kept weights)).
            dual_exponent: weight of the dual importance in ``sequential`` selection (0: pure OBS).
            state_device: where the Taylor sums / Hessians, G, S, W0 and the fp32 masters live: ``auto``
                (the weights' device) or ``cpu`` (host memory, pinned for accelerator weights; the
                per-step arithmetic then runs on the host). The results are the same.
            kernels: how the per-step arithmetic runs: ``eager`` (a dozen PyTorch ops per matrix), ``compiled``
                (one fused ``torch.compile`` kernel per matrix and step: a fraction of the memory traffic, compiled
                once per process, about 15 s on a CPU), ``auto`` (compiled on CUDA, eager elsewhere). The
                results are the same up to fp32 rounding (:mod:`..algorithms.fused`).
            general_dtype: the dtype G is kept in during the dual pass: ``float32``, or ``weights`` (the model's
                dtype: for a 16-bit model 2 bytes less per target weight, about 13 GB for a 7B model). G only
                weights the regulariser, so bf16's three significant digits change S by rounding only; G is
                then also saved in that dtype.
        """
        super().__init__()
        if general_estimator not in ("taylor", "obs"):
            raise ValueError(f"general_estimator must be 'taylor' or 'obs'; got {general_estimator!r}")
        if lambda_reg < 0 or alpha < 0:
            raise ValueError(f"lambda_reg and alpha must be >= 0; got lambda_reg={lambda_reg}, alpha={alpha}")
        if dual_epochs < 1:
            raise ValueError(f"dual_epochs must be >= 1; got {dual_epochs}")
        if update not in ("proximal", "sgd"):
            raise ValueError(f"update must be 'proximal' or 'sgd'; got {update!r}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None; got {max_grad_norm}")
        self.general_estimator = general_estimator
        self.lambda_reg = lambda_reg
        self.alpha = alpha
        self.learning_rate = alpha
        self.dual_epochs = dual_epochs
        self.max_grad_norm = max_grad_norm
        self.keep_updated_weights = keep_updated_weights
        self.damp = damp
        self.update = update
        if selection not in ("score", "sequential"):
            raise ValueError(f"selection must be 'score' or 'sequential'; got {selection!r}")
        if selection == "sequential" and reconstruct == "none":
            raise ValueError("selection 'sequential' chooses masks inside SparseGPT's OBS update: set reconstruct: obs (or exact)")
        if dual_exponent < 0:
            raise ValueError(f"dual_exponent must be >= 0; got {dual_exponent}")
        self.selection, self.dual_exponent = selection, float(dual_exponent)
        self.configure_reconstruction(reconstruct, hessian_mix)
        self.configure_state_device(state_device)
        if kernels not in ("auto", "eager", "compiled"):
            raise ValueError(f"kernels must be 'auto', 'eager' or 'compiled'; got {kernels!r}")
        self.kernels = kernels
        if general_dtype not in ("float32", "weights"):
            raise ValueError(f"general_dtype must be 'float32' or 'weights' (the model's dtype); got {general_dtype!r}")
        self.general_dtype = general_dtype
        self._fused = False  # decided per pass (start_pass): the kernels compiled and warmed up
        self._norms: dict[str, list[torch.Tensor]] = {"task": [], "reg": []}
        self.general: dict[str, torch.Tensor] = {}
        self.dual: dict[str, torch.Tensor] = {}
        self.master: dict[str, torch.Tensor] = {}  # fp32 copies of 16-bit target weights during the dual pass
        self.general_scale: float | None = None

    def check_mask_spec(self, spec: MaskSpec) -> None:
        if self.selection == "sequential":
            check_sequential_mask_spec(spec, self.default_granularity, "D-PRUNER with selection 'sequential'")

    def tolerance(self, shape: tuple[int, int], granularity: str, block_size: int) -> float:
        if self.selection == "sequential":
            return sequential_tolerance(shape, granularity, block_size)
        return super().tolerance(shape, granularity, block_size)

    def scoring_passes(self) -> list[CalibrationPass]:
        mode = "backward" if self.general_estimator == "taylor" else "forward"
        return [CalibrationPass("general", "general", mode), CalibrationPass("dual", "domain", "sgd", self.dual_epochs)]

    def load_artifacts(self, groups, saved_repr: str) -> list[str]:
        """G is reused when it was computed with the same ``general_estimator``; S only when every
        setting is the same (it depends on lambda, alpha, epochs, update) and the fine-tuned weights are
        not kept (they were not saved)."""
        done = []
        same_dtype = ("general_dtype='weights'" in saved_repr) == (self.general_dtype == "weights")  # rounded or not
        if groups.get("general_importance") and f"general_estimator={self.general_estimator!r}" in saved_repr and same_dtype:
            self.general = {n: t.float() for n, t in groups["general_importance"].items()}
            done.append("general")
        same = saved_repr == repr(self)
        if done and same and groups.get("dual_importance") and not self.keep_updated_weights:
            self.dual = {n: t.float() for n, t in groups["dual_importance"].items()}
            done.append("dual")
        return done

    def state_bytes(self, shapes, weight_bytes: int) -> int:
        """General pass: the Taylor sums (2 fp32; G is computed in their place) or, ``obs``, one fp32
        ``in x in`` Hessian per target and G; dual pass: G (``general_dtype``), S, W0 in the model's dtype, and fp32 masters
        for 16-bit weights; plus the per-step buffers (:meth:`scratch`: one, three in the dual pass, each
        as large as the largest target)."""
        weights = sum(r * c for r, c in shapes.values())
        if self.general_estimator == "taylor":
            general = weights * 8  # G is then computed in place of the sums
        else:
            general = sum(c * c for _, c in shapes.values()) * 4 + weights * 4
        master = 4 if weight_bytes < 4 and self.learning_rate > 0 else 0
        g = weight_bytes if self.general_dtype == "weights" else 4
        dual = weights * (g + 4 + weight_bytes + master) + self.scratch_bytes(shapes, 3)
        general += self.scratch_bytes(shapes, 1) if self.general_estimator == "taylor" else 0
        return max(general, dual) + self.reconstruction_state_bytes(shapes)

    def prepare(self, model, targets) -> None:
        super().prepare(model, targets)
        weight = next(iter(self.targets.values())).weight if self.targets else None
        if self.kernels == "compiled" and weight is not None and self.state_device_of(weight) != weight.device:
            raise ValueError(f"kernels: compiled runs each update where the weights are ({weight.device}); state_device: "
                             "cpu keeps the state in host memory. Use kernels: eager (or auto) with state_device: cpu")
        for scores in (self.general, self.dual):  # resumed scores: check them and put them on the device
            for name in (set(scores) | set(self.targets)) if scores else ():
                t = self.targets.get(name)
                if self.sharded and t is not None and name in scores and tuple(scores[name].shape) == t.full_shape:
                    scores[name] = local_rows(scores[name], t.weight)  # saved whole: this rank's rows
                if t is None or name not in scores or tuple(scores[name].shape) != tuple(t.shape):
                    raise ValueError(f"saved importance does not match this model's target {name!r}: resume from a run "
                                     "of the same model and targets")
                scores[name] = scores[name].to(self.state_device_of(t.weight))

    def start_pass(self, p: CalibrationPass) -> None:
        if p.mode == "collect":
            super().start_pass(p)
        elif p.name == "general":
            if self.general_estimator == "taylor":
                # uninitialised: the first gradient is written over them (no zero-fill of 8 bytes per weight)
                self._taylor = {n: TaylorState(self.new_state(t.weight_view(), zero=False),
                                               self.new_state(t.weight_view(), zero=False)) for n, t in self.targets.items()}
                self._prepare_consumers(dual=False)
            else:
                self._stats = InputStatistics(self.targets, kind="hessian", device="cpu" if self.state_device == "cpu" else None)
                self._stats.attach()
        elif p.name == "dual":
            if self.general_dtype == "weights":  # one matrix at a time: never all of G twice
                for n, t in self.targets.items():
                    self.general[n] = self.general[n].to(t.weight.dtype)
            # W0 is kept in memory in the model's dtype: it is both the regulariser's anchor and what
            # the masks are applied to (never re-read from disk).
            self.original = {n: self.copy_to_state(t.weight_view().detach()) for n, t in self.targets.items()}
            self.dual = {n: self.new_state(t.weight_view()) for n, t in self.targets.items()}
            # bf16 / fp16 weights cannot hold alpha-sized steps (most would round back to the same value):
            # the dual pass updates fp32 master copies and writes them back rounded (see sgd_step).
            self.master = {n: self.copy_to_state(t.weight_view().detach(), torch.float32) for n, t in self.targets.items()
                           if t.weight.dtype != torch.float32 and self.learning_rate > 0}
            self._prepare_consumers(dual=True)

    def reduce_across_ranks(self, p: CalibrationPass, all_reduce_sum) -> None:
        all_reduce_sum = self.state_collective(all_reduce_sum)
        if p.name == "general":
            if self.general_estimator == "taylor":
                for name in self.targets:
                    taylor_all_reduce_(self._taylor[name], all_reduce_sum)
            else:
                self._stats.all_reduce_(all_reduce_sum)
        else:
            for name in self.targets:
                all_reduce_sum(self.dual[name])

    def end_pass(self, p: CalibrationPass) -> None:
        self.unhook_gradients()
        self.free_scratch()
        if p.name != "general":
            return
        if self.general_estimator == "taylor":
            # G is computed in the Taylor sums' buffers: the pass never holds sums and G side by side
            self.general = {n: taylor_score(self._taylor[n], t.weight_view(), in_place=True) for n, t in self.targets.items()}
            del self._taylor
        else:
            self._stats.detach()
            # computed next to the weights (one Hessian there at a time), kept on the state device
            self.general = {
                n: obs_saliency(t.weight_view().float(), self._stats.hessian(n), damp=self.damp).to(self.state_device_of(t.weight))
                for n, t in self.targets.items()
            }
            del self._stats
        self.general_scale = normalise_mean_(self.general, self.shard_sum)
        self._report_stiffness()

    def _report_stiffness(self) -> None:
        """Say how many weights plain SGD on the regulariser would make diverge (2*alpha*lambda*G > 2)."""
        bound = 1.0 / max(self.alpha * self.lambda_reg, 1e-30)
        g_max = max(float(g.max()) for g in self.general.values())
        unstable = sum(int((g > bound).sum()) for g in self.general.values()) if g_max > bound else 0  # counted if any
        if unstable:
            msg = (f"{unstable} weights have 2*alpha*lambda*G > 2 (max G = {g_max:.3g}, bound {bound:.3g}): plain SGD "
                   "on the regulariser diverges there")
            if self.update == "sgd":
                log.warning("%s. Use update='proximal', or lower alpha or lambda_reg.", msg)
            else:
                log.info("%s; the proximal update keeps them stable.", msg)

    def scores(self) -> dict[str, torch.Tensor]:
        if not self.dual:
            raise RuntimeError("D-PRUNER has no dual importance yet: run the general and the dual pass first")
        return self.dual

    def artifacts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"general_importance": self.general, "dual_importance": self.dual}

    @torch.no_grad()
    def prune(self, spec: MaskSpec) -> dict[str, torch.Tensor]:
        self.master = {}  # the fine-tuned values are in the weights already
        if not self.keep_updated_weights and getattr(self, "original", None):
            for name, t in self.targets.items():
                t.weight_view().copy_(self.original[name])
        if self.selection == "score":
            return super().prune(spec)
        return prune_sequentially(self, spec, priors=self.dual_priors())

    def release(self) -> None:
        super().release()
        self.original, self.master = {}, {}
        self.free_scratch()

    def dual_priors(self) -> dict[str, torch.Tensor]:
        """``(S / mean S)^dual_exponent`` per target (floored at 1e-6 of the mean), the factor of the
        OBS saliency under ``selection: sequential``."""
        out = {}
        for name, s in self.scores().items():
            rel = (s / s.mean().clamp_min(1e-30)).clamp_min(1e-6)
            out[name] = rel.pow(self.dual_exponent)
        return out

    def __repr__(self) -> str:
        extra = ""
        if self.reconstruct != "none":
            extra = f", reconstruct={self.reconstruct!r}, hessian_mix={self.hessian_mix}, selection={self.selection!r}"
            if self.selection == "sequential":
                extra += f", dual_exponent={self.dual_exponent}"
        if self.general_dtype != "float32":  # named only when set: earlier runs' saved reprs stay equal
            extra += f", general_dtype={self.general_dtype!r}"
        return (
            f"DPrunerMethod(general_estimator={self.general_estimator!r}, lambda_reg={self.lambda_reg}, "
            f"alpha={self.alpha}, dual_epochs={self.dual_epochs}, update={self.update!r}{extra})"
        )
