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

from dataclasses import dataclass
from typing import Callable, Optional

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
def taylor_accumulate_(state: TaylorState, grad: torch.Tensor, work: torch.Tensor | None = None) -> None:
    """Add one micro-batch gradient (any dtype) to the running sums; the first one (``count`` 0) is
    written over them, so they may start uninitialised. ``work``: an fp32 buffer shaped like the sums to
    hold the gradient's fp32 copy (instead of a fresh one; mixed-dtype arithmetic on the CPU is about
    twice as slow as a conversion, then fp32 arithmetic)."""
    if work is not None and not (grad.dtype == torch.float32 and grad.device == state.grad_sum.device):
        g = work.copy_(grad)
    else:
        g = grad.to(state.grad_sum.device, torch.float32)
    if state.count == 0:
        state.grad_sum.copy_(g)
        torch.mul(g, g, out=state.sq_sum)
    else:
        state.grad_sum.add_(g)
        state.sq_sum.addcmul_(g, g)
    state.count += 1


@torch.no_grad()
def taylor_all_reduce_(state: TaylorState, all_reduce_sum) -> None:
    """Several processes: replace the sums and the count by their totals over ranks (``all_reduce_sum``:
    in-place sum of a tensor over ranks), so :func:`taylor_score` equals one process over all batches."""
    if state.count == 0:  # a rank without batches: its sums may never have been written
        state.grad_sum.zero_()
        state.sq_sum.zero_()
    all_reduce_sum(state.grad_sum)
    all_reduce_sum(state.sq_sum)
    count = torch.tensor([float(state.count)], dtype=torch.float64, device=state.grad_sum.device)
    state.count = int(round(float(all_reduce_sum(count)[0])))


@torch.no_grad()
def taylor_score(state: TaylorState, weight: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """``|gbar * W + 0.5 * W^2 * F|`` from the accumulated sums. ``in_place``: computed in the sums' own
    buffers (the result is ``state.grad_sum``; the state is used up): no new memory the size of the
    matrix, where the plain form makes five temporaries and the result."""
    if state.count == 0:
        raise RuntimeError("taylor importance has no accumulated batch: the general pass saw no data")
    w = weight.to(state.grad_sum.device, torch.float32)
    if in_place:
        taylor = state.grad_sum.div_(state.count).mul_(w)  # gbar * W
        curvature = state.sq_sum.div_(state.count).mul_(w).mul_(w)  # F * W^2
        state.count = 0
        return taylor.add_(curvature, alpha=0.5).abs_()
    gbar = state.grad_sum / state.count
    fisher = state.sq_sum / state.count
    return (gbar * w + 0.5 * w * w * fisher).abs_()


@torch.no_grad()
def normalise_mean_(scores: dict[str, torch.Tensor], all_reduce_sum: Optional[Callable[[torch.Tensor], None]] = None) -> float:
    """Divide every score by one global scalar so the mean over all entries is 1; returns the scalar.
    ``all_reduce_sum`` (in place): the scores are this process's shards, the mean is over all of them.

    One scalar (not one per matrix) keeps the relative importance between layers, and makes
    ``lambda_reg`` mean the same across models, sizes and estimators."""
    total = sum(float(s.sum(dtype=torch.float64)) for s in scores.values())  # fp64 sums, no fp64 copies
    count = sum(s.numel() for s in scores.values())
    if all_reduce_sum is not None:
        both = torch.tensor([total, float(count)], dtype=torch.float64, device=next(iter(scores.values())).device)
        all_reduce_sum(both)
        total, count = float(both[0]), int(both[1])
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
def weighted_drift(general: torch.Tensor, weight: torch.Tensor, weight0: torch.Tensor, out: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """``G * (W - W0)`` in fp32 (the regulariser's gradient without its ``2 * lambda``). ``out``: an fp32
    buffer shaped like ``weight`` (not ``weight`` itself) to write it into."""
    w = weight if weight.dtype == torch.float32 else weight.float()
    # W0 converted into the buffer first: fp32 arithmetic is about twice as fast as mixed-dtype on the CPU
    diff = weight0.to(w.device, torch.float32, copy=True) if out is None else out.copy_(weight0)
    torch.sub(w, diff, out=diff)
    return diff.mul_(general.to(w.device))


@torch.no_grad()
def regulariser_grad(
    general: torch.Tensor, weight: torch.Tensor, weight0: torch.Tensor, lambda_reg: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient of ``lambda * sum G (W - W0)^2`` with respect to W: ``2 * lambda * G * (W - W0)``, in fp32.
    ``out``: an fp32 buffer shaped like ``weight`` (not ``weight`` itself) to write it into."""
    return weighted_drift(general, weight, weight0, out).mul_(2.0 * lambda_reg)


@torch.no_grad()
def dual_accumulate_(score: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, work: torch.Tensor | None = None) -> None:
    """``S += |g*W + 0.5*(g*W)^2|`` for one micro-batch (g: gradient of the regularised loss). ``work``: an
    fp32 buffer shaped like ``score`` for ``g*W`` (it may be ``grad`` itself, which is then overwritten)."""
    g, w = grad.to(score.device, torch.float32), weight.to(score.device, torch.float32)
    gw = g * w if work is None else torch.mul(g, w, out=work)
    score.add_(gw.addcmul_(gw, gw, value=0.5).abs_())


@torch.no_grad()
def dual_step_(grad: torch.Tensor, general: torch.Tensor, score: torch.Tensor, weight0: torch.Tensor, weight: torch.Tensor,
               buffers: list[torch.Tensor], lambda_reg: float, c: float, clip: float = 1.0, proximal: bool = False,
               take_step: bool = True, squares: Optional[dict[str, list]] = None, task_norm: bool = True,
               ) -> Optional[tuple[torch.Tensor, float]]:
    """One dual-pass micro-batch on one matrix, eager, in three reused fp32 ``buffers`` shaped like it (A: the
    task gradient; B: the regulariser, then the step; C: the gradient of L_ours, then the proximal
    denominator): ``S += |g*W + 0.5*(g*W)^2|`` with ``g = g_task + 2 lambda G (W - W0)``, never clipped, and,
    with ``take_step``, the step ``clip * g_task + 2 lambda G (W - W0)``, divided by ``1 + c G`` when
    ``proximal`` (``c = 2 alpha lambda``). ``weight``: the fp32 master, or the weights brought to the state's
    device. Returns ``(step, scale)`` for ``W -= alpha * scale * step`` (``step`` may be ``grad`` itself), or
    None without a step. ``squares``: lists ``task`` and ``reg`` that receive the squared norms of ``g_task``
    (when ``task_norm``) and of the regulariser's gradient. :func:`~.fused.dual_step_` is the same in one kernel."""
    A, B, C = buffers
    task = grad if grad.dtype == torch.float32 and grad.device == score.device else A.copy_(grad)
    if squares is not None and task_norm:
        squares["task"].append(torch.linalg.vector_norm(task).square())
    k = 2.0 * lambda_reg
    if lambda_reg <= 0:
        total = task
        step = task if clip == 1.0 else torch.mul(task, clip, out=B)
    else:
        drift = weighted_drift(general, weight, weight0, out=B)  # G (W - W0)
        if squares is not None:
            squares["reg"].append(torch.linalg.vector_norm(drift).mul_(k).square())
        if clip == 1.0:
            total = step = torch.add(task, drift, alpha=k, out=B)  # g_ours is the step itself
        else:
            total = torch.add(task, drift, alpha=k, out=C)
            step = drift.mul_(k).add_(task, alpha=clip)  # clip * g_task + regulariser
    dual_accumulate_(score, total, weight, work=C)  # C now holds g*W, overwriting g_ours when it was there
    if not take_step:
        return None
    if proximal:  # step / (1 + cG) = (step / (G + 1/c)) / c: the 1/c goes into the update, one pass less
        # G + 1/c in fp32 (a 16-bit G, general_dtype 'weights', would round the sum to 1/c's spacing)
        step.div_(torch.add(general, 1.0 / c, out=C) if general.dtype == torch.float32 else C.copy_(general).add_(1.0 / c))
        return step, 1.0 / c
    return step, 1.0
