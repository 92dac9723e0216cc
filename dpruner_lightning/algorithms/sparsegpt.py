"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS weight reconstruction.

Layer-wise problem: find a sparse ``W'`` minimising ``||W X - W' X||^2``. Pruning column ``j`` of a
row and updating the remaining (later) columns by ``-(w_j / [H^-1]_jj) * H^-1_{j,:}`` is the optimal
OBS step; doing the columns left to right lets every row share one sequence of inverse Hessians,
whose rows are exactly the rows of the upper Cholesky factor ``U`` of ``H^-1``. Columns are processed
in blocks: updates inside a block are applied eagerly, updates to later columns lazily (one matmul
per block), which is exact and much faster.

:func:`sequential_sparsegpt` applies this block after block through a decoder, each block's Hessians
being measured on the outputs of the already pruned previous blocks (:mod:`.sequential`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .hessian import dead_inputs, inverse_hessian_cholesky
from .lstsq import masked_least_squares_
from .sequential import capture_block_inputs, sequential_blockwise, weighted_sets
from .targets import Target

__all__ = ["capture_block_inputs", "sequential_sparsegpt", "sparsegpt_prune_"]


def _validate(shape: tuple[int, ...], sparsity: float, prune_n: int, prune_m: int) -> None:
    """Check the pruning pattern against an ``out x in`` weight shape; ``ValueError`` if invalid."""
    if prune_n or prune_m:
        if not 0 < prune_n < prune_m:
            raise ValueError(f"N:M sparsity needs 0 < n < m, got n={prune_n}, m={prune_m}")
        if shape[1] % prune_m:
            raise ValueError(f"N:M sparsity needs in_features ({shape[1]}) divisible by m={prune_m}")
    elif not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


@torch.no_grad()
def sparsegpt_prune_(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
    keep: Tensor | None = None,
    prior: Tensor | None = None,
) -> Tensor:
    """Prune the ``out x in`` weight ``W`` in place with SparseGPT; return the keep-mask (True = kept).

    ``W`` may be a (transposed) view of a parameter: the result is written through it with ``copy_``,
    in its own dtype; all math is fp32. ``H`` is the layer Hessian of the inputs (``in x in``).
    Unstructured: in each block of ``block_size`` columns, the ``sparsity`` fraction of the block's
    weights (over all rows) with the lowest ``w^2 / d^2`` is pruned. N:M (``prune_n`` of every
    ``prune_m`` consecutive inputs, per row; ``sparsity`` ignored): chosen group by group with the same
    score. ``block_size`` is rounded down to a multiple of ``prune_m`` so groups never straddle blocks.
    Weights of dead inputs (``diag H == 0``) are zeroed; they score 0 so they are pruned first.

    ``keep``: a fixed keep-mask (``out x in``): nothing is chosen, the weights it drops are removed
    column by column with the same OBS compensation of the kept ones (reconstruction for a given mask;
    ``sparsity``/N:M are then ignored). ``prior``: a positive ``out x in`` factor multiplied into the
    selection score ``w^2 / d^2`` (e.g. a global-loss importance, see ``DPrunerMethod``), leaving the
    update unchanged.
    """
    if W.dim() != 2 or tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"W must be out x in and H in x in; got W {tuple(W.shape)}, H {tuple(H.shape)}")
    for name, t in (("keep", keep), ("prior", prior)):
        if t is not None and tuple(t.shape) != tuple(W.shape):
            raise ValueError(f"{name} must be shaped like W {tuple(W.shape)}; got {tuple(t.shape)}")
    fixed = keep is not None
    if fixed:
        prune_n = prune_m = 0
        sparsity = 1.0 - float(keep.float().mean()) if keep.numel() else 0.0
    else:
        _validate(tuple(W.shape), sparsity, prune_n, prune_m)
    nm = prune_m > 0
    if not nm and sparsity == 0.0:
        return torch.ones_like(W, dtype=torch.bool)
    if nm:
        block_size = max(prune_m, block_size // prune_m * prune_m)
    rows, cols = W.shape
    H = H.to(W.device)
    # row-major fp32 work copy (a transposed view would otherwise keep its column-major strides)
    Wf = W.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
    Wf[:, dead_inputs(H)] = 0.0  # those inputs are always zero: the weights are free to drop
    U = inverse_hessian_cholesky(H, damp)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wf[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        err = torch.zeros_like(W1)
        mask1 = torch.zeros(W1.shape, dtype=torch.bool, device=W1.device)
        if fixed:
            mask1 = ~keep[:, i1:i2].to(device=W1.device, dtype=torch.bool)
        elif not nm:
            scores = W1 * W1 / (d * d).unsqueeze(0)
            if prior is not None:
                scores = scores * prior[:, i1:i2].to(scores)
            scores = scores.flatten()
            k = int(scores.numel() * sparsity)
            # argsort, not a threshold, so ties cannot change the realised sparsity
            mask1.view(-1)[torch.argsort(scores)[:k]] = True
        for i in range(i2 - i1):
            if nm and i % prune_m == 0:
                group = W1[:, i : i + prune_m] ** 2 / (d[i : i + prune_m] ** 2).unsqueeze(0)
                if prior is not None:
                    group = group * prior[:, i1 + i : i1 + i + prune_m].to(group)
                low = torch.topk(group, prune_n, dim=1, largest=False).indices
                mask1.scatter_(1, low + i, True)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            e = (w - q) / d[i]
            # OBS compensation of the not-yet-processed columns of this block (row i of U1).
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exact zero / unchanged value, free of round-off from the update above
            err[:, i] = e
        Wf[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        Wf[:, i2:] -= err @ U[i1:i2, i2:]  # lazy update of all later columns

    W.copy_(Wf.to(W.dtype))
    return ~pruned


@torch.no_grad()
def sequential_sparsegpt(
    model: nn.Module,
    targets: dict[str, Target],
    batches: list[Tensor],
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
    device: torch.device | str | None = None,
    sets: Sequence[tuple[list[Tensor], float]] | None = None,
    priors: Mapping[str, Tensor] | None = None,
    exact: bool = False,
) -> dict[str, Tensor]:
    """Prune ``targets`` block by block with SparseGPT, each block calibrated on the outputs of the
    already pruned blocks before it. Returns the keep-masks (``out x in``) by target name.

    The layer Hessians come from ``batches``, or, with ``sets`` (``(batches, weight)`` pairs, see
    :func:`~.sequential.weighted_sets`; ``batches`` is then ignored), from the weighted sum of each
    set's per-token-mean Hessian, e.g. ``(1 - beta) H_domain + beta H_general`` (the cross-calibration
    of Williams et al., arXiv:2502.18424).
    ``priors``: per-target factors of the selection score (see :func:`sparsegpt_prune_`).
    ``exact``: keep SparseGPT's masks but replace its greedy update of the kept weights by the exact
    least-squares solution for those masks (:func:`~.lstsq.masked_least_squares_`, warm-started from it).
    Every target must live inside the decoder blocks; see :func:`~.sequential.sequential_blockwise`
    for ``device`` and memory.
    """
    for target in targets.values():  # fail before any expensive work
        _validate(target.shape, sparsity, prune_n, prune_m)
    priors = priors or {}

    def solve(name: str, target: Target, H: Tensor) -> Tensor:
        W = target.weight_view()
        work = W.detach().to(torch.float32).clone() if exact else W
        keep = sparsegpt_prune_(work, H, sparsity, prune_n, prune_m, block_size, damp, prior=priors.get(name))
        if exact:
            masked_least_squares_(W, H, keep, damp=damp, initial=work)
        return keep

    return sequential_blockwise(model, targets, sets if sets is not None else weighted_sets(batches), solve, device)
