"""Reconstruction of the kept weights for a given keep-mask (layer-wise least squares).

For one linear layer with inputs ``X`` and Hessian ``H = (2/n) X X^T``, a keep-mask ``M`` fixes which
weights stay; the best values for them minimise the output error ``||(W - W') X||^2``, i.e. for every
output row ``(w - w')^T H (w - w')`` with ``w'`` zero off the mask. Choosing a mask from a score and
simply dropping the rest leaves that error on the table; solving for the kept weights recovers much of
it (SparseGPT's update, Frantar & Alistarh 2023; the exact fixed-mask solve of Boza 2024,
arXiv:2401.02938). Two solvers, both in fp32 on a damped ``H`` (``damp`` times mean(diag H)):

* ``obs``: SparseGPT's column-by-column OBS update with the mask given (one Cholesky per matrix);
  greedy, so not exactly optimal.
* ``exact``: per-row least squares on the kept columns, ``H_KK w'_K = (H w)_K``, by conjugate
  gradients on all rows at once, warm-started from the ``obs`` solution (:mod:`.lstsq`).

Neither changes the mask: the pruned weights are exactly zero afterwards.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .lstsq import masked_least_squares_
from .sparsegpt import sparsegpt_prune_

Solver = Literal["none", "obs", "exact"]
SOLVERS = ("none", "obs", "exact")


def check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"reconstruction solver must be one of {', '.join(SOLVERS)}; got {solver!r}")


def reconstruction_error(W_ref: Tensor, W_new: Tensor, H: Tensor) -> float:
    """``sum over rows (w - w')^T H (w - w')`` (= ``(2/n) ||(W - W') X||^2``), in float64."""
    D = (W_ref.double() - W_new.double())
    return float(((D @ H.double()) * D).sum())


@torch.no_grad()
def obs_reconstruct_(W: Tensor, H: Tensor, keep: Tensor, block_size: int = 128, damp: float = 0.01) -> Tensor:
    """Zero the weights outside ``keep`` column by column, compensating the kept ones (SparseGPT's
    update with the mask fixed); ``W`` is changed in place (it may be a view). Returns ``keep``."""
    return sparsegpt_prune_(W, H, 0.0, block_size=block_size, damp=damp, keep=keep)


@torch.no_grad()
def exact_reconstruct_(W: Tensor, H: Tensor, keep: Tensor, damp: float = 0.01, block_size: int = 128,
                       tol: float = 1e-4, max_iter: int = 100) -> Tensor:
    """Optimal kept weights for the mask ``keep`` (per-row least squares under the damped ``H``), in
    place: conjugate gradients warm-started from :func:`obs_reconstruct_` (see
    :func:`~.lstsq.masked_least_squares_`). Returns ``keep``."""
    initial = W.detach().to(torch.float32).clone()
    obs_reconstruct_(initial, H, keep, block_size=block_size, damp=damp)
    return masked_least_squares_(W, H, keep, damp=damp, initial=initial, tol=tol, max_iter=max_iter)


def reconstruct_(W: Tensor, H: Tensor, keep: Tensor, solver: Solver, damp: float = 0.01, block_size: int = 128) -> Tensor:
    """Dispatch to a solver (``none`` just zeroes the pruned weights); returns ``keep``."""
    check_solver(solver)
    if solver == "obs":
        return obs_reconstruct_(W, H, keep, block_size=block_size, damp=damp)
    if solver == "exact":
        return exact_reconstruct_(W, H, keep, damp=damp, block_size=block_size)
    W.mul_(keep.to(W.dtype))
    return keep
