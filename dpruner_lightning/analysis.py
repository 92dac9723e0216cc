"""Looking at pruning results after the fact: where the masks removed weights, how much two domains'
masks agree, how much of a method's importance they keep (:func:`importance_kept`), and how perplexity
trades off against sparsity.

Only torch/numpy are needed; the plots (:mod:`figures`) import matplotlib lazily (``pip install
"dpruner-lightning[plot]"``) and draw on a private Agg canvas: they never switch an interactive
session's backend.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from .algorithms.targets import block_index
from .export import atomic_write_text, load_tensors
from .figures import block_kind_figure, new_figure, save_figure

#: What every mask-taking function accepts: a mask dict or a path (see :func:`load_masks`).
MaskSource = Union[str, os.PathLike, Mapping[str, torch.Tensor]]
#: The first numeric path component marks the decoder block (``model.layers.3.``, ``transformer.h.0.``).
_BLOCK_RE = re.compile(r"^(.*?)\.(\d+)\.")


def load_masks(masks: MaskSource) -> dict[str, torch.Tensor]:
    """Masks as ``{name: bool tensor}`` (True = kept) from a dict of bool/integer tensors, a
    ``masks.safetensors`` file, or a run folder that contains one.

    Integer tensors must hold only 0/1 (that is how runs store masks); floating tensors are refused,
    because they are almost always importance scores or weights passed by mistake."""
    if isinstance(masks, (str, os.PathLike)):
        path = Path(masks)
        if path.is_dir():
            path = path / "masks.safetensors"
        masks = load_tensors(path)
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("masks must be a non-empty {name: tensor} mapping or a path to masks.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, t in masks.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mask {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype == torch.bool:
            out[name] = t.detach().cpu()
        elif t.is_floating_point() or t.is_complex():
            raise TypeError(f"mask {name!r} has dtype {t.dtype}; expected bool or 0/1 integers (scores are not masks)")
        else:
            if bool(((t != 0) & (t != 1)).any()):
                raise ValueError(f"mask {name!r} holds values other than 0 and 1")
            out[name] = t.detach().cpu() != 0
    return out


def _split_name(name: str) -> tuple[int | None, str]:
    """``(block index, path inside the block)``; ``(None, name)`` for matrices outside numbered blocks."""
    m = _BLOCK_RE.match(name)
    if not m:
        return None, name
    return block_index(name, m.group(1)), name[m.end():]


def _kinds(names: Iterable[str]) -> dict[str, str]:
    """Module kind of every name: the last component (``q_proj``), unless that is ambiguous within a
    block -- GPT-2 has both ``attn.c_proj`` and ``mlp.c_proj`` -- then the whole in-block path."""
    inner = {n: _split_name(n)[1] for n in names}
    parents: dict[str, set[str]] = {}
    for path in inner.values():
        parents.setdefault(path.rsplit(".", 1)[-1], set()).add(path)
    return {n: (p.rsplit(".", 1)[-1] if len(parents[p.rsplit(".", 1)[-1]]) == 1 else p) for n, p in inner.items()}


def _ratio(num: int, den: int, empty: float) -> float:
    return num / den if den else empty


def _similarity_scores(c: dict[str, int]) -> dict[str, Any]:
    """Similarity scores from counts, so the overall figure pools elements rather than averaging
    per-matrix ratios. Two empty sets count as identical (1.0)."""
    kept_a, kept_b = c["total"] - c["pruned_a"], c["total"] - c["pruned_b"]
    return {
        **c,
        "jaccard_pruned": _ratio(c["pruned_both"], c["pruned_a"] + c["pruned_b"] - c["pruned_both"], 1.0),
        # Overlap coefficient: share of the smaller kept set that the other also keeps.
        "kept_overlap": _ratio(c["kept_both"], min(kept_a, kept_b), 1.0 if kept_a == kept_b else 0.0),
        "hamming_agreement": _ratio(c["agree"], c["total"], 1.0),
    }


def _preview(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")


class MaskAnalyzer:
    """Stateless helpers over mask dicts; every method also accepts a path (see :func:`load_masks`).
    Results are plain JSON-serialisable dicts, ready for ``export.atomic_write_json``."""

    @staticmethod
    def analyze_layer_sparsity(masks: MaskSource) -> dict[str, Any]:
        """Sparsity (fraction pruned) per matrix and aggregated per decoder block, per module kind and
        overall. Aggregates pool element counts (``pruned / total``), so a large ``down_proj`` weighs
        more than a small ``k_proj``, i.e. they equal the parameter-level sparsity of that group.

        Returns ``{"overall": {...}, "per_matrix": {name: {...}}, "per_block": {int: {...}},
        "per_kind": {kind: {...}}}``; every entry has ``sparsity``, ``pruned``, ``total`` (matrix
        entries also ``shape``, ``block``, ``kind``; groups also ``matrices``). Matrices outside the
        numbered blocks count in ``overall`` and ``per_kind`` but not in ``per_block``."""
        masks = load_masks(masks)
        kinds = _kinds(masks)
        per_matrix: dict[str, dict[str, Any]] = {}
        per_block: dict[int, dict[str, Any]] = {}
        per_kind: dict[str, dict[str, Any]] = {}
        overall: dict[str, Any] = {"pruned": 0, "total": 0, "matrices": 0}

        def add(group: dict[str, Any], pruned: int, total: int) -> None:
            group.update(pruned=group["pruned"] + pruned, total=group["total"] + total, matrices=group["matrices"] + 1)

        for name, keep in masks.items():
            total = keep.numel()
            pruned = total - int(torch.count_nonzero(keep))
            block = _split_name(name)[0]
            per_matrix[name] = {"sparsity": _ratio(pruned, total, 0.0), "pruned": pruned, "total": total,
                                "shape": list(keep.shape), "block": block, "kind": kinds[name]}
            add(overall, pruned, total)
            add(per_kind.setdefault(kinds[name], dict.fromkeys(overall, 0)), pruned, total)
            if block is not None:
                add(per_block.setdefault(block, dict.fromkeys(overall, 0)), pruned, total)
        for group in (overall, *per_block.values(), *per_kind.values()):
            group["sparsity"] = _ratio(group["pruned"], group["total"], 0.0)
        return {"overall": overall, "per_matrix": per_matrix, "per_block": dict(sorted(per_block.items())),
                "per_kind": per_kind}

    @staticmethod
    def compare_domain_masks(masks_a: MaskSource, masks_b: MaskSource) -> dict[str, Any]:
        """How similar two masks (e.g. healthcare vs. legal) are, per matrix and overall:

        * ``jaccard_pruned`` -- |pruned in both| / |pruned in either|;
        * ``kept_overlap`` -- |kept in both| / min(|kept in a|, |kept in b|) (overlap coefficient);
        * ``hamming_agreement`` -- fraction of positions where both make the same keep/prune decision.

        Both masks must cover exactly the same matrices with the same shapes; otherwise ``ValueError``
        says which names or shapes differ. Returns ``{"overall": {...}, "per_matrix": {name: {...}}}``
        where each entry also carries the raw counts."""
        a, b = load_masks(masks_a), load_masks(masks_b)
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if only_a or only_b:
            raise ValueError(f"masks cover different matrices: only in the first [{_preview(only_a)}], "
                             f"only in the second [{_preview(only_b)}]")
        bad = [f"{n}: {tuple(a[n].shape)} vs {tuple(b[n].shape)}" for n in a if a[n].shape != b[n].shape]
        if bad:
            raise ValueError(f"mask shapes differ: {_preview(bad)}")
        counts = {n: {"total": a[n].numel(), "pruned_a": int(torch.count_nonzero(~a[n])),
                      "pruned_b": int(torch.count_nonzero(~b[n])),
                      "pruned_both": int(torch.count_nonzero(~a[n] & ~b[n])),
                      "kept_both": int(torch.count_nonzero(a[n] & b[n])),
                      "agree": int(torch.count_nonzero(a[n] == b[n]))} for n in a}
        pooled = {k: sum(c[k] for c in counts.values()) for k in next(iter(counts.values()))}
        return {"overall": _similarity_scores(pooled),
                "per_matrix": {n: _similarity_scores(c) for n, c in counts.items()}}

    @staticmethod
    def visualize_mask_distribution(masks: MaskSource, path: str | os.PathLike,
                                    title: str = "Mask sparsity") -> Path:
        """PNG (or any format matplotlib knows from the suffix) with a block x module-kind heatmap of
        sparsity and the per-block sparsity curve. Needs matplotlib."""
        return save_figure(MaskAnalyzer.mask_distribution_figure(masks, title), path)

    @staticmethod
    def mask_distribution_figure(masks: MaskSource, title: str = "Mask sparsity"):
        """The matplotlib figure of :meth:`visualize_mask_distribution` (e.g. for TensorBoard's ``add_figure``)."""
        return block_kind_figure(*block_kind_grid(MaskAnalyzer.analyze_layer_sparsity(masks), "sparsity"),
                                 title=title, label="sparsity")


def block_kind_grid(stats: Mapping[str, Any], key: str) -> tuple[list, list[str], Any, list[float], float]:
    """``(blocks, kinds, grid, per-block values, overall value)`` of ``stats[...][key]`` for a block x
    module-kind heatmap; ``stats`` is shaped like :meth:`MaskAnalyzer.analyze_layer_sparsity`'s result
    (or :func:`importance_kept`'s). Without numbered blocks the grid is one row of the per-kind values."""
    import numpy as np

    blocks = list(stats["per_block"]) or [None]
    in_blocks = [m["kind"] for m in stats["per_matrix"].values() if m["block"] is not None]
    kinds = list(dict.fromkeys(in_blocks)) or list(stats["per_kind"])  # no empty lm_head column
    grid = np.full((len(blocks), len(kinds)), np.nan)
    if stats["per_block"]:
        for m in stats["per_matrix"].values():  # one matrix per cell: _kinds makes a kind unique within a block
            if m["block"] is not None:
                grid[blocks.index(m["block"]), kinds.index(m["kind"])] = m[key]
    else:
        grid[0] = [stats["per_kind"][k][key] for k in kinds]
    per_block = [stats["per_block"][b][key] for b in blocks] if stats["per_block"] else []
    return blocks, kinds, grid, per_block, stats["overall"][key]


@torch.no_grad()
def importance_totals(scores: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Total importance mass of every matrix (fp64 sums, one host transfer). Taken BEFORE pruning for
    scores derived from the weights (magnitude, Wanda), which pruning zeroes: see :func:`importance_kept`."""
    if not scores:
        return {}
    sums = torch.stack([s.detach().sum(dtype=torch.float64).cpu() for s in scores.values()]).tolist()
    return dict(zip(scores, sums))


@torch.no_grad()
def importance_kept(scores: Mapping[str, torch.Tensor], masks: MaskSource,
                    totals: Optional[Mapping[str, float]] = None) -> dict[str, Any]:
    """Share of the importance mass that the keep-masks keep: ``sum(score[kept]) / sum(score)`` per
    matrix, and pooled (masses summed, not ratios averaged) per decoder block, module kind and overall.

    ``scores`` must cover every mask with the same shape and be >= 0 (importance, not signed weights).
    ``totals`` (``{name: mass}``, from :func:`importance_totals` before pruning) replaces the
    denominators: scores computed from the weights after pruning are zero where the mask prunes, so
    their own sum is the kept mass only. Same layout as :meth:`MaskAnalyzer.analyze_layer_sparsity`:
    ``{"overall", "per_matrix", "per_block", "per_kind"}``, entries with ``kept``, ``total``, ``share``
    (and per matrix ``block``, ``kind``, ``weights_kept``: the share of weights kept, for reference)."""
    if not (isinstance(masks, Mapping) and all(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in masks.values())):
        masks = load_masks(masks)  # bool masks are used where they are (no host copy of a whole model's masks)
    missing = sorted(set(masks) - set(scores))
    if missing:
        raise ValueError(f"no scores for masked matrices [{_preview(missing)}]: pass the method's scores() for every mask")
    bad = [f"{n}: {tuple(scores[n].shape)} vs {tuple(k.shape)}" for n, k in masks.items() if scores[n].shape != k.shape]
    if bad:
        raise ValueError(f"score and mask shapes differ: {_preview(bad)}")
    if totals is not None and set(masks) - set(totals):
        raise ValueError(f"totals lack [{_preview(sorted(set(masks) - set(totals)))}]: take importance_totals() of every scored matrix")
    f32, rows = torch.float32, []  # fp32 sums (pairwise in torch): an fp64 cast of every product costs 3x
    for name, keep in masks.items():
        s = scores[name].detach()
        keep = keep.to(s.device)
        rows.append(torch.stack([(s * keep).sum(dtype=f32).double(), s.sum(dtype=torch.float64), s.min().double(),
                                 torch.count_nonzero(keep).double()]).cpu())
    sums = torch.stack(rows).tolist()  # per matrix: kept mass, total mass, smallest score, weights kept
    negative = [n for n, row in zip(masks, sums) if row[2] < 0]
    if negative:
        raise ValueError(f"scores of [{_preview(negative)}] are negative: importance_kept needs importance >= 0 "
                         "(e.g. |W|, G, S), not signed weights")
    kinds = _kinds(masks)
    per_matrix: dict[str, dict[str, Any]] = {}
    per_block: dict[int, dict[str, float]] = {}
    per_kind: dict[str, dict[str, float]] = {}
    overall = {"kept": 0.0, "total": 0.0}
    for (name, keep), (kept, total, _, n_kept) in zip(masks.items(), sums):
        total = float(totals[name]) if totals is not None else total
        block = _split_name(name)[0]
        per_matrix[name] = {"kept": kept, "total": total, "block": block, "kind": kinds[name],
                            "weights_kept": _ratio(int(n_kept), keep.numel(), 1.0)}
        groups = [overall, per_kind.setdefault(kinds[name], {"kept": 0.0, "total": 0.0})]
        if block is not None:
            groups.append(per_block.setdefault(block, {"kept": 0.0, "total": 0.0}))
        for group in groups:
            group["kept"] += kept
            group["total"] += total
    for group in (overall, *per_matrix.values(), *per_block.values(), *per_kind.values()):
        group["share"] = group["kept"] / group["total"] if group["total"] > 0 else 1.0  # nothing to lose
    return {"overall": overall, "per_matrix": per_matrix, "per_block": dict(sorted(per_block.items())), "per_kind": per_kind}


class PerformanceTracker:
    """Sparsity/perplexity measurements (one dict per run, extra metrics allowed) with a Pareto
    frontier, CSV export/import and a plot."""

    BASE_FIELDS = ("method", "sparsity", "perplexity")

    def __init__(self, measurements: Iterable[Mapping[str, Any]] = ()) -> None:
        self.measurements: list[dict[str, Any]] = []
        for m in measurements:
            m = dict(m)
            self.add_measurement(m.pop("sparsity"), m.pop("perplexity"), m.pop("method", "default"), **m)

    def add_measurement(self, sparsity: float, perplexity: float, method: str = "default", **metrics: Any) -> dict[str, Any]:
        """Record one run. ``sparsity`` must be in [0, 1) and ``perplexity`` > 0 (``inf`` is accepted
        for a collapsed model, NaN is not); extra keyword metrics (``domain_ppl=...``, ``seconds=...``)
        must be numbers, strings, booleans or None."""
        sparsity, perplexity = float(sparsity), float(perplexity)
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if math.isnan(perplexity) or perplexity <= 0.0:
            raise ValueError(f"perplexity must be > 0, got {perplexity}")
        for key, value in metrics.items():
            if value is not None and not isinstance(value, (int, float, str, bool)):
                raise TypeError(f"metric {key!r} must be a number, string, bool or None, got {type(value).__name__}")
        row = {"method": str(method), "sparsity": sparsity, "perplexity": perplexity, **metrics}
        self.measurements.append(row)
        return row

    def methods(self) -> list[str]:
        """Method names in order of first appearance."""
        return list(dict.fromkeys(m["method"] for m in self.measurements))

    def get_pareto_frontier(self, method: str | None = None) -> list[dict[str, Any]]:
        """Measurements not dominated on (higher sparsity, lower perplexity), sorted by sparsity.

        ``method=None`` pools every method (the best trade-offs overall, whoever reached them); a
        method name restricts the candidates to that method's points. A point is dominated when
        another has sparsity >= and perplexity <= with at least one strict; exact duplicates are kept."""
        pts = [m for m in self.measurements if method is None or m["method"] == method]

        def dominated(p: dict[str, Any]) -> bool:
            return any(q["sparsity"] >= p["sparsity"] and q["perplexity"] <= p["perplexity"]
                       and (q["sparsity"] > p["sparsity"] or q["perplexity"] < p["perplexity"]) for q in pts)

        return sorted((dict(p) for p in pts if not dominated(p)), key=lambda p: (p["sparsity"], p["perplexity"]))

    def fieldnames(self) -> list[str]:
        """CSV header: the base fields, then every extra metric name sorted, so it is stable across runs."""
        extra = {k for m in self.measurements for k in m} - set(self.BASE_FIELDS)
        return [*self.BASE_FIELDS, *sorted(extra)]

    def export_metrics(self, path: str | os.PathLike) -> Path:
        """Write all measurements as CSV (a ``.json`` suffix writes a JSON list instead); metrics a
        run did not record are left empty."""
        if Path(path).suffix.lower() == ".json":
            return atomic_write_text(path, json.dumps(self.measurements, indent=2) + "\n")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.fieldnames(), restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in m.items()} for m in self.measurements)
        return atomic_write_text(path, buf.getvalue())

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> "PerformanceTracker":
        """Read a file written by :meth:`export_metrics`; numeric cells come back as int/float, empty
        cells are dropped, anything else (method names too) stays a string."""
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        # The method name stays text even when it looks numeric ("1" must not become 1.0 and back).
        return cls({k: v if k == "method" else _parse_cell(v) for k, v in row.items() if v != ""} for row in rows)

    def plot_performance_curves(self, path: str | os.PathLike, metric: str = "perplexity",
                                title: str | None = None) -> Path:
        """One line per method of ``metric`` (log scale) against sparsity, with the overall Pareto
        frontier dashed when plotting perplexity. Needs matplotlib."""
        fig = new_figure()
        ax = fig.axes[0]
        drawn = False
        for method in self.methods():
            pts = sorted((m["sparsity"], float(m[metric])) for m in self.measurements
                         if m["method"] == method and isinstance(m.get(metric), (int, float)))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
                drawn = True
        if not drawn:
            raise ValueError(f"no measurement has a numeric {metric!r} to plot")
        if metric == "perplexity" and len(self.methods()) > 1:
            front = self.get_pareto_frontier()
            ax.plot([p["sparsity"] for p in front], [p["perplexity"] for p in front], "k--", alpha=0.5,
                    label="Pareto frontier")
        ax.set_yscale("log")
        from matplotlib.ticker import LogFormatter  # plain "6", "20" rather than "6 x 10^0" labels

        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter())
        ax.set(xlabel="sparsity", ylabel=f"{metric} (log scale)", title=title or f"{metric} vs. sparsity")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        return save_figure(fig, path)


def _parse_cell(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value
