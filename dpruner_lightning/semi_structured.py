"""2:4 (semi-structured) sparse weights for the GPU kernels of ``torch.sparse.to_sparse_semi_structured``.

A weight is 2:4 when every group of 4 consecutive inputs of every row holds at most 2 non-zeros
(``mask.granularity: "2:4"`` produces exactly that). NVIDIA's sparse tensor cores (Ampere, compute
capability 8.0, and later) multiply such a matrix stored as its kept half plus 2-bit indices, skipping
the zeros; torch exposes them on CUDA for float16 / bfloat16 weights whose shape is a multiple of the
kernel's tile (read from torch at run time, see :func:`shape_constraint`).

:func:`semi_structured_plan` checks everything that needs no GPU (target type, 2:4, shape) and says
which linears would be converted; :func:`to_semi_structured` first checks the device and dtype, then
the plan, and only then converts (nothing is converted unless every target can be). Re-exported from
:mod:`dpruner_lightning.export`; :mod:`dpruner_lightning.speed` times the result.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Weight dtypes the semi-structured kernels take (int8 / fp8 need scales this package does not produce).
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
REQUIREMENT = ("semi-structured (2:4) sparse weights need a CUDA GPU of compute capability >= 8.0 and "
               "float16 / bfloat16 weights (model.to('cuda', torch.bfloat16))")


class Not24Error(ValueError):
    """A weight that should be 2:4 is not (the message names the matrix and the first bad group)."""


def is_2_4(weight: torch.Tensor) -> bool:
    """Whether each group of 4 consecutive inputs of every row holds at most 2 non-zeros."""
    if weight.shape[-1] % 4:
        return False
    return bool(((weight.reshape(-1, 4) != 0).sum(dim=1) <= 2).all())


def check_2_4(weight: torch.Tensor, name: str) -> None:
    """Raise :class:`Not24Error` naming ``name`` (and the first offending row / group) unless
    ``weight`` is 2:4."""
    if weight.dim() != 2:
        raise Not24Error(f"{name}: weight of shape {tuple(weight.shape)} is not a matrix: 2:4 applies to linear weights")
    rows, cols = weight.shape
    if cols % 4:
        raise Not24Error(f"{name}: weight {rows} x {cols} cannot be 2:4: its {cols} inputs are not a multiple of 4. "
                         "Exclude it from the targets (targets.exclude_modules).")
    counts = (weight.detach().reshape(rows, cols // 4, 4) != 0).sum(dim=2)
    bad = counts > 2
    if bool(bad.any()):
        row, group = (int(i) for i in bad.nonzero()[0])
        raise Not24Error(f"{name}: weight {rows} x {cols} is not 2:4: {int(bad.sum())} of {counts.numel()} groups of 4 "
                         f"inputs hold more than 2 non-zeros (first: row {row}, inputs {4 * group}..{4 * group + 3} hold "
                         f"{int(counts[row, group])}). Prune it with mask.granularity '2:4'.")


def shape_constraint(dtype: torch.dtype) -> tuple[int, int]:
    """``(rows, cols)`` that a weight's shape must be a multiple of for the kernel that
    ``to_sparse_semi_structured`` picks (cuSPARSELt, or CUTLASS when forced), as torch declares it."""
    from torch.sparse import SparseSemiStructuredTensor

    cls = (torch.sparse.SparseSemiStructuredTensorCUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS
           else torch.sparse.SparseSemiStructuredTensorCUSPARSELT)
    if dtype not in cls._DTYPE_SHAPE_CONSTRAINTS:
        raise ValueError(f"{cls.__name__} takes no {dtype} weights; {REQUIREMENT}")
    c = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return c.sparse_min_rows, c.sparse_min_cols


def semi_structured_plan(model: nn.Module, target_modules: Optional[str] = None, exclude_modules: Optional[str] = None,
                         dtype: Optional[torch.dtype] = None) -> dict[str, nn.Linear]:
    """The linears :func:`to_semi_structured` would convert (default targets: every linear in the decoder
    blocks), after the checks that need no GPU: each is an ``nn.Linear``, 2:4, and shaped as the kernel
    needs for ``dtype`` (default: the weights' own dtype if float16 / bfloat16, else bfloat16). Raises
    naming the first module that fails."""
    from .algorithms.targets import find_targets

    out: dict[str, nn.Linear] = {}
    for name, target in find_targets(model, target_modules, exclude_modules).items():
        module = target.module
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name}: only nn.Linear can take semi-structured weights (got {type(module).__name__}); "
                            "exclude it from the targets")
        w = module.weight
        kernel_dtype = dtype or (w.dtype if w.dtype in SEMI_STRUCTURED_DTYPES else torch.bfloat16)
        rows, cols = shape_constraint(kernel_dtype)
        if w.shape[0] % rows or w.shape[1] % cols:
            raise ValueError(f"{name}: weight {tuple(w.shape)} does not fit the {kernel_dtype} semi-structured kernel, "
                             f"which needs rows a multiple of {rows} and inputs a multiple of {cols}; exclude it from the targets")
        check_2_4(w, name)
        out[name] = module
    return out


def semi_structured_linear(name: str, linear: nn.Linear) -> nn.Linear:
    """A new Linear (sharing the bias) whose weight is the 2:4-compressed copy of ``linear.weight``
    (CUDA, float16 / bfloat16, 2:4: raises ``RuntimeError`` naming ``name`` otherwise)."""
    from torch.sparse import to_sparse_semi_structured

    w = linear.weight.detach()
    if not w.is_cuda:
        raise RuntimeError(f"{name}: weight is on {w.device}; {REQUIREMENT}")
    if w.dtype not in SEMI_STRUCTURED_DTYPES:
        raise RuntimeError(f"{name}: weight is {w.dtype}; {REQUIREMENT}")
    if not is_2_4(w):
        raise RuntimeError(f"{name}: weight {tuple(w.shape)} does not satisfy 2:4 (at most 2 non-zeros in every 4 inputs)")
    try:
        packed = to_sparse_semi_structured(w.contiguous())
    except Exception as err:  # the kernel's own shape / device checks
        raise RuntimeError(f"{name}: to_sparse_semi_structured rejected weight {tuple(w.shape)}: {err}") from err
    new = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    new.weight = nn.Parameter(packed, requires_grad=False)
    new.bias = linear.bias
    return new


def _check_device(model: nn.Module, plan: dict[str, nn.Linear]) -> None:
    """The requirements that no amount of pruning fixes: a CUDA GPU of capability >= 8.0, half weights."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"no CUDA device here: {REQUIREMENT}")
    for name, module in plan.items():
        w = module.weight
        if not w.is_cuda:
            raise RuntimeError(f"{name}: weight is on {w.device}; {REQUIREMENT}")
        if w.dtype not in SEMI_STRUCTURED_DTYPES:
            raise RuntimeError(f"{name}: weight is {w.dtype}; {REQUIREMENT}")
        if torch.cuda.get_device_capability(w.device) < (8, 0):
            raise RuntimeError(f"{name}: {torch.cuda.get_device_name(w.device)} has compute capability "
                               f"{torch.cuda.get_device_capability(w.device)}; {REQUIREMENT}")


def to_semi_structured(model: nn.Module, target_modules: Optional[str] = None,
                       exclude_modules: Optional[str] = None) -> nn.Module:
    """Convert the target linears (default: every linear in the decoder blocks) in place to
    semi-structured (2:4) sparse weights for the GPU kernels, and return ``model``.

    Checked before anything is converted, in this order: a CUDA device and float16 / bfloat16 weights
    (``RuntimeError`` naming the requirement and the first module), every target an ``nn.Linear`` whose
    weight is 2:4 (:class:`Not24Error` naming the matrix) and shaped for the kernel (``ValueError``)."""
    from .algorithms.targets import find_targets

    targets = {n: t.module for n, t in find_targets(model, target_modules, exclude_modules).items()}
    _check_device(model, targets)  # the cheap, unfixable requirement first: on a CPU nothing else runs
    plan = semi_structured_plan(model, target_modules, exclude_modules)
    new = {name: semi_structured_linear(name, module) for name, module in plan.items()}
    for name, module in new.items():
        path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(path) if path else model, attr, module)
    log.info("%d linears now hold semi-structured (2:4) sparse weights", len(new))
    return model
