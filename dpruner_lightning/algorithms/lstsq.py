"""Least squares of a linear layer's kept weights under a fixed mask, for all rows at once.

For a layer Hessian ``H = (2/n) X X^T`` and a keep-mask, every output row ``w`` gets the kept values
``w'`` (zero off the mask) minimising ``(w - w')^T H (w - w')``: the normal equations restricted to
the row's kept coordinates K are ``H_KK w'_K = (H w)_K``. Every row has its own K, so the systems are
gathered into one batch (rows padded to the largest K with an identity block) and solved by batched
Cholesky, a chunk of rows at a time to bound memory. Cost per row: ``|K|^3 / 3`` flops (50% of a
4096-wide layer: 2.9 GFLOP a row). Solved on the damped ``H`` (``damp`` times mean(diag H) on the
diagonal), like SparseGPT.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .hessian import damped, dead_inputs


@torch.no_grad()
def masked_least_squares_(
    W: Tensor,
    H: Tensor,
    keep: Tensor,
    damp: float = 0.01,
    method: str = "cg",
    initial: Tensor | None = None,
    tol: float = 1e-4,
    max_iter: int = 100,
    chunk_bytes: int = 256 * 2**20,
) -> Tensor:
    """Write the least-squares kept weights into ``W`` (``out x in``, may be a view) and zeros elsewhere.

    ``method``: ``cg`` (from ``initial``, default the masked ``W``; stops when every row's residual
    norm is below ``tol`` times its right-hand side's, or after ``max_iter`` iterations; CG never
    increases the error in the H norm) or ``cholesky`` (direct; ``chunk_bytes`` bounds the gathered
    ``rows x K x K`` systems solved at once). Weights of dead inputs (``diag H == 0``) are set to
    zero. Returns ``keep`` (bool).
    """
    if method not in ("cg", "cholesky"):
        raise ValueError(f"method must be 'cg' or 'cholesky'; got {method!r}")
    if W.dim() != 2 or tuple(keep.shape) != tuple(W.shape) or tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"need W (out x in), keep like W and H (in x in); got {tuple(W.shape)}, "
                         f"{tuple(keep.shape)}, {tuple(H.shape)}")
    keep = keep.to(device=W.device, dtype=torch.bool)
    H = H.to(W.device)
    A = damped(H, damp)
    w0 = W.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
    w0[:, dead_inputs(H)] = 0.0
    rhs = w0 @ A  # row r: A w0_r (A is symmetric)
    if method == "cg":
        start = w0 if initial is None else initial.to(w0)
        W.copy_(_conjugate_gradients(A, rhs, keep.to(torch.float32), start, tol, max_iter).to(W.dtype))
        return keep
    out = torch.zeros_like(w0)
    counts = keep.sum(1)
    k_max = int(counts.max()) if counts.numel() else 0
    if k_max == 0:
        W.copy_(out.to(W.dtype))
        return keep
    step = max(1, chunk_bytes // (4 * k_max * k_max))
    # Kept column indices of every row, left-aligned and padded (stable sort keeps them in order).
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :k_max]
    valid = torch.arange(k_max, device=W.device).unsqueeze(0) < counts.unsqueeze(1)
    for r0 in range(0, W.shape[0], step):
        idx, v = order[r0 : r0 + step], valid[r0 : r0 + step].to(torch.float32)
        sys = A[idx.unsqueeze(2), idx.unsqueeze(1)] * (v.unsqueeze(2) * v.unsqueeze(1))
        sys.diagonal(dim1=1, dim2=2).add_(1.0 - v)  # padding: identity rows, zero right-hand side
        b = torch.gather(rhs[r0 : r0 + step], 1, idx) * v
        L, info = torch.linalg.cholesky_ex(sys)
        if bool((info != 0).any()):  # numerically indefinite (tiny damp): fall back to a general solve
            x = torch.linalg.solve(sys.double(), b.double().unsqueeze(2)).squeeze(2).float()
        else:
            x = torch.cholesky_solve(b.unsqueeze(2), L).squeeze(2)
        out[r0 : r0 + step].scatter_(1, idx, x * v)
    out *= keep  # padded slots pointed at column order[0]; clear anything not kept
    W.copy_(out.to(W.dtype))
    return keep


def _conjugate_gradients(A: Tensor, rhs: Tensor, m: Tensor, x: Tensor, tol: float, max_iter: int) -> Tensor:
    """Solve ``(A x_r)_K = rhs_r,K`` with ``x_r`` zero off K (``m``: 1 on K) for every row ``r`` at once."""
    b = rhs * m
    x = x * m
    inv_diag = m / A.diagonal().unsqueeze(0)  # Jacobi preconditioner, zero off the mask
    r = b - (x @ A) * m
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1)
    b_norm = b.norm(dim=1).clamp_min(1e-30)
    for _ in range(max_iter):
        if bool((r.norm(dim=1) <= tol * b_norm).all()):
            break
        Ap = (p @ A) * m
        pAp = (p * Ap).sum(1)
        step = torch.where(pAp > 0, rz / pAp.clamp_min(1e-30), torch.zeros_like(rz))
        x += step.unsqueeze(1) * p
        r -= step.unsqueeze(1) * Ap
        z = r * inv_diag
        rz_new = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta.unsqueeze(1) * p
        rz = rz_new
    return x * m
