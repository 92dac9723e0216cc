"""Figures of ``dpruner compare`` / ``sweep`` for TensorBoard: perplexity against sparsity per method
(domain and general), and how much the rows' masks overlap.

The inputs are the result rows of the row runner (the ``rows`` of ``comparison.json`` / ``sweep.json``:
``method`` (the row label), ``method_repr`` (``dense`` for the dense row), ``sparsity_targets``,
``sparsity_requested`` (sweep), ``ppl_domain``, ``ppl_general``, ``error``) and, for the overlap, every
row's keep-masks packed by :func:`pack_masks` while the row's module is alive: 1 bit per weight, or for
a model over :data:`DEFAULT_SAMPLE` weights a seeded sample of whole rows (output units) that depends
only on the matrices' shapes, so every row of the table stores the same weights and the overlap is
estimated on them (a 7B model: 2 MiB per row instead of ~0.8 GB).

:func:`log_comparison_figures` logs both figures as images (matplotlib needed; without it, said once
and skipped).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from .analysis import load_masks
from .comparison_rows import DENSE
from .figures import add_figure, new_figure, plotting_available

log = logging.getLogger(__name__)

#: Weights :func:`pack_masks` stores per row by default: every one up to 2**24 (2 MiB of bits), else a
#: seeded sample of whole matrix rows totalling about that many.
DEFAULT_SAMPLE = 1 << 24
#: Bits set in every byte value: popcounts of packed masks without numpy>=2's bitwise_count.
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_CHUNK = 1 << 24  # bytes per popcount step: bounded temporaries whatever the model
_SPARSITY_TOKEN = re.compile(r"(^|\s)s=\S+")


# -- perplexity against sparsity ----------------------------------------------------------------------
def series_label(label: str) -> str:
    """A row's curve: its label without the sparsity (``d_pruner s=0.3 lambda_reg=0.1`` ->
    ``d_pruner lambda_reg=0.1``), so a sweep's rows of one method and setting join one line."""
    return " ".join(_SPARSITY_TOKEN.sub(" ", label).split()) or label


def _is_dense(row: Mapping[str, Any]) -> bool:
    return row.get("method_repr", row.get("method")) == DENSE


def perplexity_series(results: Sequence[Mapping[str, Any]]) -> tuple[dict[str, dict[str, list[tuple[float, float]]]], dict[str, float]]:
    """``({curve: {"domain": [(sparsity, ppl), ...], "general": [...]}}, {"domain": dense ppl, ...})``.
    The sparsity is the realised one on the targets (``sparsity_targets``; a row without it uses
    ``sparsity_requested``); points are sorted by it. Failed rows and missing or non-finite
    perplexities (a collapsed model's ``inf`` cannot sit on a log axis) are left out."""
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    dense: dict[str, float] = {}
    for row in results:
        if row.get("error"):
            continue
        x = row.get("sparsity_targets")
        x = row.get("sparsity_requested") if x is None else x
        for metric in ("domain", "general"):
            ppl = row.get(f"ppl_{metric}")
            if not isinstance(ppl, (int, float)) or not math.isfinite(ppl):
                continue
            if _is_dense(row):
                dense[metric] = float(ppl)
            elif isinstance(x, (int, float)):
                curve = series.setdefault(series_label(str(row.get("method", "?"))), {"domain": [], "general": []})
                curve[metric].append((float(x), float(ppl)))
    for curve in series.values():
        for points in curve.values():
            points.sort()
    return series, dense


def perplexity_figure(results: Sequence[Mapping[str, Any]], title: str = "perplexity vs. sparsity"):
    """Two panels (domain, general) of perplexity (log scale) against sparsity, one line per method,
    the dense model dashed. ValueError when no row has a perplexity."""
    series, dense = perplexity_series(results)
    if not series and not dense:
        raise ValueError("no result row has a finite ppl_domain / ppl_general to plot")
    fig = new_figure(ncols=2, width=12.0)  # first: without matplotlib, its ImportError names the extra
    from matplotlib.ticker import LogFormatter  # "20", not "2 x 10^1"; minor labels thinned over decades

    for ax, metric in zip(fig.axes, ("domain", "general")):
        for label, curve in series.items():
            if curve[metric]:
                ax.plot(*zip(*curve[metric]), marker="o", label=label)
        if metric in dense:
            ax.axhline(dense[metric], color="gray", linestyle="--", label=DENSE)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter())
        ax.set(xlabel="sparsity (target weights)", ylabel=f"{metric} perplexity (log scale)", title=metric)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    return fig


# -- mask overlap ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedMasks:
    """One row's masks, compactly: per matrix its PRUNED positions as ``numpy.packbits`` bits (zero
    padded), of every weight (``sample`` None) or of the matrix rows :func:`sample_rows` picks."""

    shapes: dict[str, tuple[int, ...]]
    bits: dict[str, np.ndarray]
    counts: dict[str, int]
    """Positions stored per matrix (the unpadded bit count)."""
    sample: Optional[int] = None
    seed: int = 0

    def layout(self) -> tuple:
        """What two packings must share to be compared: matrices, shapes, sampling."""
        return tuple(sorted(self.shapes.items())), self.sample, self.seed

    def pruned(self, name: str) -> np.ndarray:
        """The stored weights of matrix ``name`` (flattened), True where the mask prunes."""
        return np.unpackbits(self.bits[name], count=self.counts[name]).astype(bool)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.bits.values())


def sample_rows(shapes: Mapping[str, Sequence[int]], sample: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Sorted row indices of every matrix, about ``sample`` weights in all, each matrix in proportion to
    its size (at least one row): a function of the shapes, ``sample`` and ``seed`` only, so every row of
    a table picks the same weights. Whole rows: one gather per matrix, no per-weight random index to
    draw, sort and gather (which costs seconds at 2**24 positions)."""
    if sample < 1:
        raise ValueError(f"sample must be >= 1 weights, got {sample}")
    total = sum(math.prod(shapes[name]) for name in shapes)
    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(shapes):
        rows = int(shapes[name][0]) if len(shapes[name]) else 1
        k = min(rows, max(1, round(rows * sample / total)))
        out[name] = np.sort(rng.choice(rows, size=k, replace=False))
    return out


@torch.no_grad()
def pack_masks(masks: Mapping[str, torch.Tensor], sample: Optional[int] = DEFAULT_SAMPLE, seed: int = 0) -> PackedMasks:
    """``{name: bool keep-mask}`` (any device) as :class:`PackedMasks`, one matrix at a time on the host.
    About ``sample`` weights are stored: all of them when the masks hold no more, else the seeded rows of
    :func:`sample_rows` (a 7B model's row then takes 2 MiB instead of ~0.8 GB and its overlaps are
    estimated). ``sample=None`` stores every weight."""
    if not masks:
        raise ValueError("pack_masks needs a non-empty {name: bool keep-mask} dict")
    bad = [n for n, k in masks.items() if not isinstance(k, torch.Tensor) or k.dtype != torch.bool]
    if bad:
        raise TypeError(f"pack_masks takes bool keep-masks (True = kept); not bool: {bad[:3]}")
    shapes = {n: tuple(masks[n].shape) for n in sorted(masks)}
    if sample is not None and sum(math.prod(s) for s in shapes.values()) <= sample:
        sample = None  # everything fits: exact, and comparable with an explicit full packing
    picked = sample_rows(shapes, sample, seed) if sample is not None else {}
    bits, counts = {}, {}
    for name in shapes:
        keep = masks[name].detach()
        if name in picked:
            keep = keep.reshape(keep.shape[0] if keep.dim() else 1, -1)[torch.from_numpy(picked[name]).to(keep.device)]
        pruned = (~keep.reshape(-1)).cpu().numpy()
        bits[name], counts[name] = np.packbits(pruned), int(pruned.size)
    return PackedMasks(shapes, bits, counts, sample, seed if sample is not None else 0)


def packed_masks_of_saved_rows(results: Sequence[Mapping[str, Any]], labels: Optional[Sequence[str]] = None,
                               sample: Optional[int] = DEFAULT_SAMPLE, seed: int = 0) -> dict[str, PackedMasks]:
    """:func:`pack_masks` of the rows (all, or those in ``labels``) whose ``log_dir`` holds a
    ``masks.safetensors`` (rows run with ``save_artifacts``), e.g. rows kept from an earlier run."""
    out = {}
    for row in results:
        label, folder = row.get("method"), row.get("log_dir")
        if row.get("error") or not folder or (labels is not None and label not in labels):
            continue
        path = Path(folder) / "masks.safetensors"
        if path.is_file():
            out[str(label)] = pack_masks(load_masks(path), sample, seed)
    return out


def _popcount(a: np.ndarray, b: Optional[np.ndarray] = None) -> int:
    """Bits set in ``a`` (or in ``a & b``), a chunk at a time."""
    total = 0
    for i in range(0, a.size, _CHUNK):
        part = a[i:i + _CHUNK] if b is None else np.bitwise_and(a[i:i + _CHUNK], b[i:i + _CHUNK])
        total += int(_POPCOUNT[part].sum(dtype=np.int64))
    return total


def mask_overlap(packed: Mapping[str, PackedMasks], metric: str = "jaccard") -> tuple[list[str], np.ndarray]:
    """``(row labels, matrix)`` of how much the rows' pruned weights coincide, pooled over all matrices:

    * ``jaccard``: |pruned by both| / |pruned by either| (symmetric; 1.0 when both prune nothing). Two
      independent random masks at sparsity s score s / (2 - s), 1/3 at 50%;
    * ``pruned_in_common``: entry [i, j] = |pruned by both| / |pruned by row i|, the share of row i's
      pruned weights that row j prunes too (1.0 when row i prunes nothing).

    Every row must be packed over the same matrices with the same sampling."""
    if metric not in ("jaccard", "pruned_in_common"):
        raise ValueError(f"metric must be 'jaccard' or 'pruned_in_common', got {metric!r}")
    labels = list(packed)
    if not labels:
        raise ValueError("mask_overlap needs at least one row's packed masks")
    first = packed[labels[0]]
    odd = [label for label in labels if packed[label].layout() != first.layout()]
    if odd:
        raise ValueError(f"rows {odd} were packed over other matrices, shapes or sampling than {labels[0]!r}: "
                         "pack every row's masks with the same pack_masks(sample=..., seed=...)")
    names = list(first.shapes)
    count = np.array([sum(_popcount(packed[a].bits[n]) for n in names) for a in labels], dtype=np.int64)
    both = np.diag(count).astype(np.float64)
    for i, a in enumerate(labels):
        for j in range(i + 1, len(labels)):
            bits_b = packed[labels[j]].bits
            both[i, j] = both[j, i] = sum(_popcount(packed[a].bits[n], bits_b[n]) for n in names)
    with np.errstate(invalid="ignore", divide="ignore"):
        if metric == "jaccard":
            out = both / (count[:, None] + count[None, :] - both)
        else:
            out = both / count[:, None]
    return labels, np.nan_to_num(out, nan=1.0)  # 0 / 0: nothing pruned on either side, nothing disagrees


def overlap_figure(labels: Sequence[str], matrix: np.ndarray, title: str = "mask overlap (Jaccard of pruned weights)",
                   label: str = "Jaccard"):
    """Heatmap of a :func:`mask_overlap` matrix in [0, 1], values written in the cells up to 15 rows; the
    image stays within 1600 x 1300 px however many rows."""
    n = len(labels)
    fig = new_figure(width=min(16.0, max(5.0, 0.6 * n + 3.5)), height=min(13.0, max(4.0, 0.5 * n + 2.5)))  # <= 1600 x 1300 px
    ax = fig.axes[0]
    im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize="small",
                        color="black" if matrix[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)
    return fig


# -- logging ----------------------------------------------------------------------------------------
def log_comparison_figures(tb_experiment_or_writer, results: Sequence[Mapping[str, Any]],
                           masks: Optional[Mapping[str, Any]] = None, prefix: str = "comparison", step: int = 0) -> list[str]:
    """Log ``<prefix>/perplexity_vs_sparsity`` and, when two or more rows have masks,
    ``<prefix>/mask_overlap`` (Jaccard) as TensorBoard images; returns the tags written.

    ``tb_experiment_or_writer``: a ``SummaryWriter`` or a Lightning ``TensorBoardLogger``. ``masks``:
    ``{row label: PackedMasks}`` (:func:`pack_masks`) or ``{row label: {name: bool mask}}`` (packed
    here); rows without masks (dense, structured, failed) are simply absent. A figure that cannot be
    drawn (e.g. rows packed with other settings) is a warning, not an error: it comes after the tables
    are written, at the end of a long comparison."""
    writer = getattr(tb_experiment_or_writer, "experiment", tb_experiment_or_writer)
    if not hasattr(writer, "add_image"):
        raise TypeError(f"log_comparison_figures needs a SummaryWriter or a TensorBoardLogger, got {type(writer).__name__}")
    if not plotting_available():
        return []
    tags = []

    def draw(tag: str, make) -> None:
        try:
            add_figure(writer, tag, make(), step)
            tags.append(tag)
        except Exception:
            log.warning("TensorBoard figure %s skipped", tag, exc_info=True)

    if any(perplexity_series(results)):
        draw(f"{prefix}/perplexity_vs_sparsity", lambda: perplexity_figure(results, f"{prefix}: perplexity vs. sparsity"))
    rows = [label for label, m in (masks or {}).items() if isinstance(m, PackedMasks) or m]
    if len(rows) >= 2:
        def overlap():
            packed = {label: m if isinstance(m, PackedMasks) else pack_masks(m) for label, m in masks.items() if label in rows}
            return overlap_figure(*mask_overlap(packed), f"{prefix}: mask overlap (Jaccard of pruned weights)")

        draw(f"{prefix}/mask_overlap", overlap)
    return tags
