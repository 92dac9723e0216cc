"""Input statistics of target linears: layer Hessians and per-column squared input norms.

For a linear layer ``y = W x`` the layer-wise reconstruction loss ``||W X - W' X||^2`` has Hessian
``H = 2 X X^T`` (``in x in``). SparseGPT and the OBS importance estimator need ``H``; Wanda only needs
its diagonal, i.e. the squared norm of every input feature. Both are gathered here with forward
pre-hooks, in fp32, without touching the modules.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .targets import Target

Kind = Literal["hessian", "sq_norm"]


@dataclass
class _Slot:
    """Accumulator of one distinct input stream (possibly shared by several targets)."""

    value: Tensor | None = None  # H (in x in) or sum of x_j^2 (in)
    tokens: int = 0


@dataclass
class _Seen:
    """A recently accumulated input tensor, so that siblings reading the same tensor can skip it."""

    ref: weakref.ref
    slot: _Slot
    seen_by: set[str] = field(default_factory=set)


class InputStatistics:
    """Accumulate ``H = (2/n) sum x x^T`` (``kind="hessian"``) or ``sum x_j^2`` (``kind="sq_norm"``) of
    the inputs of ``targets``.

    Targets that read the very same input tensor (q/k/v projections, gate/up) are accumulated once
    and share the same result tensor, which saves time and memory. Sharing is detected, without any
    per-architecture table, from the input tensor itself: same ``data_ptr``/shape/stride/dtype/version
    *and* still alive (checked through a weak reference, so a freed buffer reused by another tensor is
    never mistaken for the same input). A target that sees the same tensor twice (it was called twice)
    counts it twice.

    ``device``: where accumulators live (default: the device of each input). Use as a context manager
    (``with InputStatistics(t) as stats: model(x)``) or call :meth:`attach` / :meth:`detach`.
    """

    def __init__(self, targets: dict[str, Target], kind: Kind = "hessian", device: torch.device | str | None = None):
        if kind not in ("hessian", "sq_norm"):
            raise ValueError(f"kind must be 'hessian' or 'sq_norm', got {kind!r}")
        self.targets = targets
        self.kind = kind
        self.device = torch.device(device) if device is not None else None
        self._slots: dict[str, _Slot] = {}
        self._recent: dict[tuple, _Seen] = {}
        self._handles: list = []

    # -- hooks -------------------------------------------------------------------------------------
    def attach(self) -> "InputStatistics":
        if self._handles:
            return self
        for name, target in self.targets.items():
            hook = self._make_hook(name)
            self._handles.append(target.module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recent.clear()  # drop references to activations

    def __enter__(self) -> "InputStatistics":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _make_hook(self, name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            self._observe(name, x)

        return hook

    @staticmethod
    def _key(x: Tensor) -> tuple:
        try:
            version = x._version
        except RuntimeError:  # inference-mode tensors have no version counter (and cannot be edited)
            version = -1
        return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, version)

    def _observe(self, name: str, x: Tensor) -> None:
        # Forget activations that were freed: their buffers may be reused by unrelated tensors.
        self._recent = {k: s for k, s in self._recent.items() if s.ref() is not None}
        key = self._key(x)
        seen = self._recent.get(key)
        mine = self._slots.get(name)
        if seen is not None and name not in seen.seen_by:  # alive + same key => same data
            if mine is None:  # first time: join the group of the sibling that already accumulated x
                self._slots[name] = mine = seen.slot
            if mine is seen.slot:
                seen.seen_by.add(name)
                return
        if mine is None:
            self._slots[name] = mine = _Slot()
        self._accumulate(mine, x)
        self._recent[key] = _Seen(weakref.ref(x), mine, {name})

    @torch.no_grad()
    def _accumulate(self, slot: _Slot, x: Tensor) -> None:
        device = self.device if self.device is not None else x.device
        x = x.detach().reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float32)
        t = x.shape[0]
        if t == 0:
            return
        if self.kind == "sq_norm":
            if slot.value is None:
                slot.value = torch.zeros(x.shape[1], device=device)
            slot.value += (x * x).sum(0)
        else:
            if slot.value is None:
                slot.value = torch.zeros(x.shape[1], x.shape[1], device=device)
            # Running average (as in SparseGPT): rescale the old mean instead of summing raw outer
            # products, so large token counts never overflow and H keeps a stable scale.
            slot.value *= slot.tokens / (slot.tokens + t)
            x = x * (2.0 / (slot.tokens + t)) ** 0.5
            slot.value.addmm_(x.t(), x)
        slot.tokens += t

    # -- results -----------------------------------------------------------------------------------
    def _slot(self, name: str) -> _Slot:
        if name not in self.targets:
            raise KeyError(f"{name!r} is not one of the observed targets")
        slot = self._slots.get(name)
        if slot is None or slot.value is None:
            raise RuntimeError(f"no input was seen yet for {name!r}: run forward passes while attached")
        return slot

    def hessian(self, name: str) -> Tensor:
        """``(2/n) sum x x^T`` (``in x in``, fp32); the same tensor object for targets sharing an input."""
        if self.kind != "hessian":
            raise RuntimeError("hessian() needs InputStatistics(kind='hessian')")
        return self._slot(name).value  # type: ignore[return-value]

    def sq_norm(self, name: str) -> Tensor:
        """``sum_tokens x_j^2`` per input column (``[in]``, fp32). With ``kind="hessian"`` it is derived
        from the diagonal of H (``diag(H) * n / 2``), i.e. a new tensor."""
        slot = self._slot(name)
        if self.kind == "sq_norm":
            return slot.value  # type: ignore[return-value]
        return slot.value.diagonal() * (slot.tokens / 2.0)  # type: ignore[union-attr]

    def num_tokens(self, name: str) -> int:
        """Number of input rows (tokens) accumulated for ``name``."""
        slot = self._slots.get(name)
        return 0 if slot is None else slot.tokens

    @torch.no_grad()
    def all_reduce_(self, all_reduce_sum) -> None:
        """Several processes: make every accumulator the one of all ranks' tokens together.

        ``all_reduce_sum`` sums a tensor over ranks in place. H is a running average, so it is turned
        back into a sum (``H * n``), summed with the token counts, and divided again; ``sq_norm`` is
        already a sum. Every rank must have seen input for every target (and hence share inputs the
        same way, which holds for the same model): slots are reduced in target order."""
        done: set[int] = set()
        for name in self.targets:
            slot = self._slot(name)
            if id(slot) in done:  # targets sharing an input share the slot: reduce it once
                continue
            done.add(id(slot))
            tokens = torch.tensor([float(slot.tokens)], dtype=torch.float64, device=slot.value.device)
            all_reduce_sum(tokens)
            total = int(round(float(tokens[0])))
            if self.kind == "hessian":
                slot.value.mul_(float(slot.tokens))
                all_reduce_sum(slot.value)
                slot.value.div_(float(max(total, 1)))
            else:
                all_reduce_sum(slot.value)
            slot.tokens = total

    def clear(self) -> None:
        """Drop all accumulators (hooks stay attached)."""
        self._slots.clear()
        self._recent.clear()


def dead_inputs(H: Tensor) -> Tensor:
    """Bool mask of input columns that never fired (``diag(H) == 0``)."""
    return H.diagonal() == 0


def damped(H: Tensor, damp: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """A copy of ``H + damp * mean(diag H) * I`` in ``dtype``, dead inputs (``diag H == 0``) given a unit
    diagonal first so that the matrix is invertible (their weights must be zeroed by the caller)."""
    A = H.to(dtype).clone()
    dead = dead_inputs(A)
    A[dead, dead] = 1.0
    A.diagonal().add_(damp * A.diagonal().mean())
    return A


def inverse_hessian_cholesky(H: Tensor, damp: float = 0.01) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (so ``U^T U`` is that inverse).

    Dead inputs (``diag H == 0``) get a diagonal of 1 first so the matrix is invertible; their rows of
    ``U`` are meaningless and callers must zero those weight columns / give them zero importance
    (see :func:`dead_inputs`). Computed in fp32; retried in float64 if the Cholesky fails.
    """
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H must be a square matrix, got shape {tuple(H.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("H contains NaN or Inf values; check the calibration activations")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    for dtype in (torch.float32, torch.float64):
        A = damped(H, damp, dtype)
        L, info = torch.linalg.cholesky_ex(A)
        if info.item() != 0:
            continue
        Hinv = torch.cholesky_inverse(L)
        U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if info.item() == 0:
            return U.to(torch.float32)
    raise RuntimeError(
        "Cholesky of the damped Hessian failed even in float64: H is not positive definite. "
        f"Increase damp (now {damp}) or use more calibration tokens."
    )


def obs_saliency(W_out_in: Tensor, H: Tensor, damp: float = 0.01) -> Tensor:
    """OBS saliency ``W^2 / diag(U)^2`` (``out x in``, fp32), ``U`` from :func:`inverse_hessian_cholesky`.

    ``diag(U)_j^2`` is the inverse-Hessian diagonal of column ``j`` once the earlier columns have been
    eliminated, i.e. the denominator of the OBS error ``w^2 / [H^-1]_jj`` used by SparseGPT. Dead
    inputs get zero saliency (their weights never influence the output)."""
    if W_out_in.shape[1] != H.shape[0]:
        raise ValueError(f"W has {W_out_in.shape[1]} input columns but H is {tuple(H.shape)}")
    H = H.to(W_out_in.device)
    d = inverse_hessian_cholesky(H, damp).diagonal()
    sal = W_out_in.detach().float() ** 2 / (d * d).unsqueeze(0)
    sal[:, dead_inputs(H)] = 0.0
    return sal
