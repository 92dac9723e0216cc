"""The per-step arithmetic of D-PRUNER's passes as single fused kernels (``kernels: compiled``).

After every micro-batch each target matrix is updated elementwise: the general pass adds the gradient
and its square to the Taylor sums; the dual pass forms the regularised gradient, adds its terms to S
and takes the (proximal) SGD step on the fp32 master. Eager PyTorch runs the dual step as about a dozen
separate ops per matrix, each reading and writing whole fp32 matrices (about 150 bytes per weight);
``torch.compile`` turns each update below into one loop that reads every operand once and writes each
result once (about 30 bytes per weight). On an accelerator, where the eager ops are also a dozen kernel
launches per matrix, that is the difference between a dual pass well above a bare forward+backward and
one close to it; on a 2-core CPU it halves the dual step (README, "Scale").

The formulas are the eager ones of :mod:`.importance` and :class:`~dpruner_lightning.methods.dpruner.
DPrunerMethod` written once as tensor expressions; a test checks both give the same scores and weights.
Matrices are passed flattened and compiled with dynamic shapes, so one kernel serves every shape; the
scalars are 0-dim tensors, so a new ``alpha`` or ``lambda`` does not recompile. Compiling costs time
once per process (about 15 s for the dual step on a 2-core CPU): :func:`warm_up` pays it before the
first micro-batch and turns a platform that cannot compile into a clear error there.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

log = logging.getLogger(__name__)

_COMPILED: dict[str, object] = {}


def _taylor_update(grad: torch.Tensor, grad_sum: torch.Tensor, sq_sum: torch.Tensor) -> None:
    g = grad.float()
    grad_sum.add_(g)
    sq_sum.add_(g * g)


def _dual_step(grad: torch.Tensor, general: torch.Tensor, score: torch.Tensor, weight0: torch.Tensor,
               weight: torch.Tensor, master: Optional[torch.Tensor], k: torch.Tensor, clip: torch.Tensor,
               lr: torch.Tensor, c: torch.Tensor, proximal: bool, stats: bool):
    task = grad.float()
    general = general.float()  # a 16-bit G (general_dtype 'weights'): 1 + cG must not round in 16 bits
    current = master if master is not None else weight.float()
    drift = general * (current - weight0.float())  # G (W - W0)
    total = task + k * drift  # the gradient of L_ours, unclipped: S uses it
    gw = total * current
    score.add_((gw + 0.5 * gw * gw).abs())
    step = clip * task + k * drift
    if proximal:  # the regulariser taken implicitly (DPrunerMethod's docstring)
        step = step / (1.0 + c * general)
    new = current - lr * step
    if master is not None:
        master.copy_(new)
    weight.copy_(new)
    if stats:
        return (task * task).sum(), (drift * drift).sum() * (k * k)
    return None


def _compiled(name: str):
    fn = _COMPILED.get(name)
    if fn is None:
        fn = torch.compile({"taylor": _taylor_update, "dual": _dual_step}[name], dynamic=True, fullgraph=True)
        _COMPILED[name] = fn
    return fn


def fusable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether these tensors can go to one fused kernel: all on one device and contiguous (a transposed
    ``Conv1D`` weight view is not: its matrix keeps the eager path)."""
    present = [t for t in tensors if t is not None]
    return all(t.is_contiguous() and t.device == present[0].device for t in present)


@torch.no_grad()
def taylor_update_(grad: torch.Tensor, grad_sum: torch.Tensor, sq_sum: torch.Tensor) -> None:
    """``grad_sum += g``, ``sq_sum += g * g`` (g: ``grad`` in fp32) in one kernel; see
    :func:`~.importance.taylor_accumulate_`, whose non-first update this is."""
    _compiled("taylor")(*_flat(grad, grad_sum, sq_sum))


@torch.no_grad()
def dual_step_(grad: torch.Tensor, general: torch.Tensor, score: torch.Tensor, weight0: torch.Tensor,
               weight: torch.Tensor, master: Optional[torch.Tensor], scalars: dict[str, torch.Tensor],
               proximal: bool, stats: bool) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """One dual-pass micro-batch on one matrix, in one kernel:
    ``S += |g*W + 0.5*(g*W)^2|`` with ``g = g_task + k G (W - W0)``, then
    ``W -= lr * (clip * g_task + k G (W - W0)) [/ (1 + c G)]`` on the fp32 ``master`` (written rounded to
    ``weight``) or on fp32 ``weight`` itself. ``scalars``: 0-dim fp32 tensors ``k`` (2 lambda), ``clip``,
    ``lr``, ``c`` (2 alpha lambda) from :func:`dual_scalars`. Returns the squared norms of ``g_task`` and of
    the regulariser's gradient when ``stats``."""
    s = scalars
    return _compiled("dual")(*_flat(grad, general, score, weight0, weight, master), s["k"], s["clip"], s["lr"], s["c"],
                             proximal, stats)


def _flat(*tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Each (contiguous) tensor as a flat 1-D tensor on the same memory, so in-place writes reach it. Not a
    ``view(-1)``: the compiled function would guard on the view's 2-D base (shapes and which are square) and
    recompile for new shapes; nor a parameter (``requires_grad`` is guarded on too)."""
    return [None if t is None else
            torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))
            for t in tensors]


def dual_scalars(k: float, clip: float, lr: float, c: float, device: torch.device) -> dict[str, torch.Tensor]:
    """The dual step's scalars as 0-dim fp32 tensors on ``device`` (values change, the kernel does not)."""
    return {name: torch.tensor(v, dtype=torch.float32, device=device) for name, v in
            (("k", k), ("clip", clip), ("lr", lr), ("c", c))}


def warm_up(device: torch.device, weight_dtype: torch.dtype, dual: bool, master: bool, proximal: bool = True,
            stats: bool = False, general_dtype: torch.dtype = torch.float32) -> None:
    """Compile the kernel a pass will use (on small tensors of the same dtypes, so the real matrices reuse
    it) before its first micro-batch; raises a RuntimeError naming the fix when this platform cannot
    compile (e.g. no C++ compiler for the CPU backend, no Triton for CUDA)."""
    shape = (1 << 16,)  # the kernel is reused for every size (dynamic shapes); its first size guides the code
    # it generates (a tiny one made the CPU kernel single-threaded, 30% slower on the real matrices)
    t0 = time.perf_counter()
    try:
        w = torch.zeros(shape, dtype=weight_dtype, device=device)
        f = [torch.zeros(shape, dtype=torch.float32, device=device) for _ in range(3)]
        if not dual:
            taylor_update_(w, f[0], f[1])
        else:
            dual_step_(w, f[0].to(general_dtype), f[1], w.clone(), w.clone(), f[2] if master else None,
                       dual_scalars(0.0, 1.0, 0.0, 0.0, device), proximal, stats)
    except Exception as err:  # torch.compile fails in many ways (missing compiler, backend errors)
        raise RuntimeError(f"kernels: compiled needs torch.compile to work on {device} ({type(err).__name__}: "
                           f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}); set kernels: eager "
                           "(the same results, more memory traffic per step)") from err
    seconds = time.perf_counter() - t0
    if seconds > 1.0:  # a real compile, not a cache hit: say where the pause went
        log.info("fused %s kernel compiled for %s in %.1f s (once per process)", "dual-step" if dual else "Taylor",
                 device, seconds)
