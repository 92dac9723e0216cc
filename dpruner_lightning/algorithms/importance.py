"""Importance scores of D-PRUNER (Zhang et al., NAACL 2024), as pure functions on tensors.

Every tensor here is laid out ``out x in`` (see :mod:`targets`) and accumulated in fp32. Callers run
these under ``torch.no_grad()``: an in-place update of a buffer with a tensor that requires grad
silently records a graph that keeps every temporary alive.

* General importance, ``taylor`` estimator (second-order Taylor expansion, as in the paper):
  ``G = | gbar * W + 0.5 * W^2 * F |`` with ``gbar`` the mean gradient and ``F`` the mean squared
  gradient over micro-batches (the empirical Fisher as diagonal Hessian; per-sample Fisher when a
  micro-batch holds one sequence).
* General importance, ``obs`` estimator: SparseGPT's Optimal-Brain-Surgeon saliency, see
  :func:`dpruner_lightning.algorithms.hessian.obs_saliency`.
* Dual importance: ``S += | g * W + 0.5 * (g * W)^2 |`` after each micro-batch of the regularised
  loss ``L_next + lambda * sum G (W - W0)^2``, whose regulariser gradient :func:`regulariser_grad`
  adds to the task gradient analytically (no autograd graph over every weight).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TaylorState:
    """Running sums of one matrix's micro-batch gradients and squared gradients (fp32)."""

    grad_sum: torch.Tensor
    sq_sum: torch.Tensor
    count: int = 0

    @classmethod
    def zeros_like(cls, weight: torch.Tensor, device: torch.device | None = None) -> "TaylorState":
        z = torch.zeros(weight.shape, dtype=torch.float32, device=device or weight.device)
        return cls(z, z.clone())


@torch.no_grad()
def taylor_accumulate_(state: TaylorState, grad: torch.Tensor) -> None:
    """Add one micro-batch gradient (any dtype) to the running sums."""
    g = grad.to(state.grad_sum.device, torch.float32)
    state.grad_sum.add_(g)
    state.sq_sum.addcmul_(g, g)
    state.count += 1


@torch.no_grad()
def taylor_all_reduce_(state: TaylorState, all_reduce_sum) -> None:
    """Several processes: replace the sums and the count by their totals over ranks (``all_reduce_sum``:
    in-place sum of a tensor over ranks), so :func:`taylor_score` equals one process over all batches."""
    all_reduce_sum(state.grad_sum)
    all_reduce_sum(state.sq_sum)
    count = torch.tensor([float(state.count)], dtype=torch.float64, device=state.grad_sum.device)
    state.count = int(round(float(all_reduce_sum(count)[0])))


@torch.no_grad()
def taylor_score(state: TaylorState, weight: torch.Tensor) -> torch.Tensor:
    """``|gbar * W + 0.5 * W^2 * F|`` from the accumulated sums."""
    if state.count == 0:
        raise RuntimeError("taylor importance has no accumulated batch: the general pass saw no data")
    w = weight.to(state.grad_sum.device, torch.float32)
    gbar = state.grad_sum / state.count
    fisher = state.sq_sum / state.count
    return (gbar * w + 0.5 * w * w * fisher).abs_()


@torch.no_grad()
def normalise_mean_(scores: dict[str, torch.Tensor]) -> float:
    """Divide every score by one global scalar so the mean over all entries is 1; returns the scalar.

    One scalar (not one per matrix) keeps the relative importance between layers, and makes
    ``lambda_reg`` mean the same across models, sizes and estimators."""
    total = sum(float(s.double().sum()) for s in scores.values())
    count = sum(s.numel() for s in scores.values())
    if count == 0 or not total > 0:
        raise RuntimeError(
            "general importance is zero everywhere (or not finite): check that the calibration data "
            "produced a non-zero loss gradient / non-zero inputs"
        )
    scale = total / count
    for s in scores.values():
        s.div_(scale)
    return scale


@torch.no_grad()
def regulariser_grad(
    general: torch.Tensor, weight: torch.Tensor, weight0: torch.Tensor, lambda_reg: float
) -> torch.Tensor:
    """Gradient of ``lambda * sum G (W - W0)^2`` with respect to W: ``2 * lambda * G * (W - W0)``."""
    diff = weight.to(torch.float32) - weight0.to(device=weight.device, dtype=torch.float32)
    return diff.mul_(general.to(weight.device)).mul_(2.0 * lambda_reg)


@torch.no_grad()
def dual_accumulate_(score: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor) -> None:
    """``S += |g*W + 0.5*(g*W)^2|`` for one micro-batch (g: gradient of the regularised loss)."""
    gw = grad.to(score.device, torch.float32) * weight.to(score.device, torch.float32)
    score.add_(gw.addcmul_(gw, gw, value=0.5).abs_())


@dataclass
class DualStepStats:
    """Norms logged per step so users can see whether G actually shapes S."""

    task_grad_norm_sq: float = 0.0
    reg_grad_norm_sq: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def task_grad_norm(self) -> float:
        return self.task_grad_norm_sq**0.5

    @property
    def reg_grad_norm(self) -> float:
        return self.reg_grad_norm_sq**0.5
