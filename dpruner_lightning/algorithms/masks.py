"""From scores to keep-masks, and applying them.

A mask is a bool tensor shaped like the ``out x in`` weight view, True = kept. Every selector prunes an
exact number of entries per unit (the lowest scores; ties broken by position), so realised sparsity is
the request up to rounding within a unit:

* ``layer``: one threshold per matrix (D-PRUNER's default);
* ``row``: per output row (Wanda);
* ``block``: per block of ``block_size`` input columns across all rows (D-PRUNER's "iterative blocking");
* ``N:M`` (e.g. ``"2:4"``): exactly N zeros in every M consecutive inputs of each row;
* ``global``: one threshold over every target (see :func:`global_masks`).

Layer-wise allocation :func:`owl_sparsities` (Yin et al., 2024) gives each decoder block its own
sparsity while keeping the parameter-weighted mean equal to the request.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

GRANULARITIES = ("layer", "row", "block", "global")
_NM = re.compile(r"^(\d+):(\d+)$")


def parse_granularity(granularity: str) -> tuple[str, int, int]:
    """``"layer"`` -> ``("layer", 0, 0)``; ``"2:4"`` -> ``("n:m", 2, 4)``. Raises on anything else."""
    g = granularity.strip().lower()
    if g in GRANULARITIES:
        return g, 0, 0
    m = _NM.match(g)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ValueError(f"invalid N:M pattern {granularity!r}: need 0 < N < M (e.g. '2:4' or '4:8')")
        return "n:m", n, mm
    raise ValueError(
        f"unknown mask granularity {granularity!r}: use one of {', '.join(GRANULARITIES)} or an N:M "
        "pattern such as '2:4'"
    )


def check_sparsity(sparsity: float) -> None:
    if not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1) (a fraction of the target weights); got {sparsity}")


def _prune_lowest(scores_2d: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask that drops the ``k`` lowest entries of each row of ``scores_2d``."""
    keep = torch.ones_like(scores_2d, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores_2d, k, dim=1, largest=False, sorted=False).indices
        keep.scatter_(1, idx, False)
    return keep


@torch.no_grad()
def select_mask(score: torch.Tensor, sparsity: float, granularity: str = "layer", block_size: int = 128) -> torch.Tensor:
    """Keep-mask for one ``out x in`` score matrix (``global`` is not per matrix: see :func:`global_masks`)."""
    kind, n, m = parse_granularity(granularity)
    score = score.float()
    rows, cols = score.shape
    if kind == "n:m":
        if cols % m:
            raise ValueError(f"N:M pattern {n}:{m} needs in_features divisible by {m}; this matrix has {cols}")
        return _prune_lowest(score.reshape(-1, m), n).reshape(rows, cols)
    check_sparsity(sparsity)
    if kind == "layer":
        return _prune_lowest(score.reshape(1, -1), round(sparsity * score.numel())).reshape(rows, cols)
    if kind == "row":
        return _prune_lowest(score, round(sparsity * cols))
    if kind == "block":
        if block_size <= 0:
            raise ValueError(f"block_size must be positive; got {block_size}")
        keep = torch.empty_like(score, dtype=torch.bool)
        for start in range(0, cols, block_size):
            blk = score[:, start : start + block_size]
            keep[:, start : start + block_size] = _prune_lowest(
                blk.reshape(1, -1), round(sparsity * blk.numel())
            ).reshape(blk.shape)
        return keep
    raise ValueError("the 'global' granularity selects over all matrices: use global_masks()")


@torch.no_grad()
def global_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over every matrix, pruning exactly ``round(sparsity * total)`` entries.

    The k-th smallest value is found by bisection on counts (one pass over the scores per step), so
    no concatenated copy of all scores is ever made (that copy alone is 26 GB for a 7B model)."""
    check_sparsity(sparsity)
    total = sum(s.numel() for s in scores.values())
    k = round(sparsity * total)
    if k == 0:
        return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    lo = min(float(s.min()) for s in scores.values())
    hi = max(float(s.max()) for s in scores.values())

    def count_below_or_at(t: float) -> int:
        return sum(int((s.float() <= t).sum()) for s in scores.values())

    for _ in range(64):  # invariant: count(<= lo) < k <= count(<= hi), unless lo is the minimum
        if hi - lo <= abs(hi) * 1e-7 + 1e-30:
            break
        mid = lo + (hi - lo) / 2
        if count_below_or_at(mid) >= k:
            hi = mid
        else:
            lo = mid
    threshold = hi
    masks: dict[str, torch.Tensor] = {}
    # Everything strictly below the threshold goes; entries equal to it (ties) go in order until k.
    remaining = k - sum(int((s.float() < threshold).sum()) for s in scores.values())
    for name, s in scores.items():
        s = s.float()
        keep = s >= threshold
        if remaining > 0:
            ties = (s.reshape(-1) <= threshold) & keep.reshape(-1)
            tie_idx = ties.nonzero().squeeze(1)[:remaining]
            keep.view(-1)[tie_idx] = False
            remaining -= tie_idx.numel()
        masks[name] = keep
    return masks


@torch.no_grad()
def owl_sparsities(
    scores_by_block: Mapping[int, list[torch.Tensor]], sparsity: float, outlier_m: float = 5.0, lam: float = 0.08
) -> dict[int, float]:
    """Outlier-weighted layerwise sparsity (OWL, Yin et al. 2024).

    A block's outlier ratio D is the fraction of its scores above ``outlier_m`` times their mean; blocks
    with more outliers are pruned less. Sparsities span ``[sparsity - lam, sparsity + lam]`` and their
    parameter-weighted mean equals ``sparsity``."""
    check_sparsity(sparsity)
    blocks = sorted(scores_by_block)
    ratios, sizes = [], []
    for b in blocks:
        mats = scores_by_block[b]
        mean = sum(float(s.double().sum()) for s in mats) / max(1, sum(s.numel() for s in mats))
        outliers = sum(int((s.float() > outlier_m * mean).sum()) for s in mats)
        sizes.append(sum(s.numel() for s in mats))
        ratios.append(outliers / max(1, sizes[-1]))
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    span = r.max() - r.min()
    density = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    density = density - (density * w).sum() / w.sum() + (1 - sparsity)  # weighted mean density = 1 - s
    layer_sparsity = 1 - _clamp_keeping_mean(density, w, 1 - sparsity, low=0.001, high=1.0)
    return {b: float(s) for b, s in zip(blocks, layer_sparsity)}


def _clamp_keeping_mean(x: torch.Tensor, w: torch.Tensor, mean: float, low: float, high: float) -> torch.Tensor:
    """``x`` clamped to ``[low, high]`` with what the clamp removed spread over the entries still inside
    the bounds, so the ``w``-weighted mean stays ``mean`` (at extreme sparsities a plain clamp moves the
    overall sparsity by a percent or two). Each round pins at least one more entry: at most len(x) rounds."""
    x = x.clone()
    for _ in range(len(x) + 1):
        x = x.clamp(low, high)
        gap = mean * float(w.sum()) - float((x * w).sum())
        if abs(gap) <= 1e-12 * float(w.sum()):
            break
        free = x < high if gap > 0 else x > low
        if not bool(free.any()):
            raise ValueError(f"cannot reach a mean of {mean} within [{low}, {high}]")
        x[free] += gap / float(w[free].sum())
    return x


@torch.no_grad()
def apply_mask_(weight_view: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero the pruned entries in place (``weight_view`` may be a transposed view of the parameter)."""
    weight_view.mul_(keep.to(device=weight_view.device, dtype=weight_view.dtype))


def mask_sparsity(keep: torch.Tensor) -> float:
    return 1.0 - float(keep.float().mean())


def expected_tolerance(shape: tuple[int, int], granularity: str, block_size: int = 128) -> float:
    """Largest rounding error of the realised sparsity of one matrix for this granularity
    (each selection unit rounds its count to the nearest entry: at most half an entry per unit)."""
    kind, _, _ = parse_granularity(granularity)
    rows, cols = shape
    units = {"layer": 1, "row": rows, "block": -(-cols // max(1, block_size))}.get(kind, 0)
    return (0.5 * units) / (rows * cols) + 1e-9


def choose_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    granularity: str = "layer",
    block_size: int = 128,
    allocation: str = "uniform",
    block_of: Mapping[str, int | None] | None = None,
    owl_m: float = 5.0,
    owl_lambda: float = 0.08,
) -> dict[str, torch.Tensor]:
    """Keep-masks for every scored matrix: allocation (uniform / OWL per decoder block) then granularity."""
    kind, _, _ = parse_granularity(granularity)
    if kind == "global":
        return global_masks(scores, sparsity)
    per_matrix = {name: sparsity for name in scores}
    if allocation == "owl":
        if kind == "n:m":
            raise ValueError("OWL allocation varies sparsity per block; an N:M pattern fixes it: pick one")
        if block_of is None:
            raise ValueError("OWL allocation needs the decoder block of every matrix (block_of)")
        by_block: dict[int, list[torch.Tensor]] = {}
        for name, s in scores.items():
            if block_of.get(name) is not None:
                by_block.setdefault(block_of[name], []).append(s)
        block_sparsity = owl_sparsities(by_block, sparsity, owl_m, owl_lambda)
        per_matrix = {n: block_sparsity.get(block_of.get(n), sparsity) for n in scores}
    return {name: select_mask(s, per_matrix[name], granularity, block_size) for name, s in scores.items()}


@torch.no_grad()
def realised_sparsity(model: torch.nn.Module, target_weights: Mapping[str, torch.Tensor]) -> dict:
    """Fractions of exact zeros: per target matrix, over all targets, and over all model parameters."""
    per_matrix = {name: float((w == 0).float().mean()) for name, w in target_weights.items()}
    target_zeros = sum(int((w == 0).sum()) for w in target_weights.values())
    target_total = sum(w.numel() for w in target_weights.values())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    all_total = sum(p.numel() for p in model.parameters())
    return {
        "targets": target_zeros / max(1, target_total),
        "all_parameters": all_zeros / max(1, all_total),
        "target_parameters": target_total,
        "all_parameter_count": all_total,
        "per_matrix": per_matrix,
    }


def check_realised(
    per_matrix: Mapping[str, float], requested: Mapping[str, float], shapes: Mapping[str, tuple[int, int]],
    granularity: str, block_size: int = 128,
) -> None:
    """Raise if a matrix's realised sparsity is below its request by more than rounding allows.

    (Weights that were already zero may make a matrix sparser than asked: that is not an error.)"""
    bad = []
    for name, got in per_matrix.items():
        want = requested[name]
        if got < want - expected_tolerance(shapes[name], granularity, block_size):
            bad.append(f"{name}: requested {want:.4f}, realised {got:.4f}")
    if bad:
        raise RuntimeError("realised sparsity below the request:\n  " + "\n  ".join(bad[:10]))
