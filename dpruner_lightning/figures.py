"""Drawing figures with matplotlib and logging them to TensorBoard: the primitives under
:mod:`analysis`'s plots, the fit run's images (:func:`~dpruner_lightning.run_figures.add_run_figures`) and
:mod:`comparison_figures`; also the sample and 2-D histogram behind the G-vs-S figure.

matplotlib is optional (``pip install "dpruner-lightning[plot]"``, also in ``[test]``) and imported
lazily. Every figure is drawn on its own Agg canvas, never through pyplot: no global backend switch in
an interactive session, no figure left open. This module imports nothing else of the package.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

PLOT_HINT = 'plotting needs matplotlib: pip install "dpruner-lightning[plot]"'
_missing_logged = False  # "matplotlib is missing" is said once per process, not once per figure


def plotting_available() -> bool:
    """Whether matplotlib can be imported; the first time it cannot, say so once (INFO) and why."""
    global _missing_logged
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        if not _missing_logged:
            log.info("TensorBoard figures skipped: %s", PLOT_HINT)
            _missing_logged = True
        return False
    return True


def new_figure(ncols: int = 1, width: float = 7.0, height: float = 4.5):
    """A figure on its own Agg canvas with ``ncols`` axes side by side; ImportError names the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(PLOT_HINT) from err
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    fig.subplots(1, ncols)
    return fig


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Render to a temporary file next to ``path`` and rename it in, like every other writer here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix[1:].lower() or "png"  # the temp name hides the suffix, so pass the format
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def figure_image(fig, dpi: int = 100) -> np.ndarray:
    """The figure as an ``H x W x 3`` uint8 array (what ``SummaryWriter.add_image`` takes as ``HWC``).
    The figures here are 11 x 4.5 inches (wider only with many module kinds): about 1100 x 450 px."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def add_figure(writer, tag: str, fig, step: int = 0) -> None:
    """Log ``fig`` as a TensorBoard image under ``tag`` (rendered here: no pyplot state involved)."""
    writer.add_image(tag, figure_image(fig), step, dataformats="HWC")


@torch.no_grad()
def sample_pairs(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
                 n: int = 50_000, seed: int = 0) -> dict[str, Any]:
    """A seeded random sample (with replacement) of at most ``n`` weights over all masked matrices, each
    matrix drawing in proportion to its size: ``{"x": first, "y": second, "kept": mask}`` as numpy
    arrays at the same positions (e.g. G and S of D-PRUNER). Cost: ``n`` gathers, whatever the model."""
    if n < 1:
        raise ValueError(f"sample_pairs: n must be >= 1, got {n}")
    names = [k for k in masks if k in first and k in second]
    if not names:
        raise ValueError("sample_pairs: no masked matrix has both scores; pass score dicts keyed like the masks")
    sizes = np.array([masks[k].numel() for k in names], dtype=np.float64)
    counts = np.floor(sizes / sizes.sum() * min(n, int(sizes.sum()))).astype(int)
    gen = torch.Generator().manual_seed(seed)
    xs, ys, ks = [], [], []
    for name, count in zip(names, counts):
        if count == 0:
            continue
        idx = torch.randint(0, masks[name].numel(), (int(count),), generator=gen)
        for out, t in ((xs, first[name]), (ys, second[name]), (ks, masks[name])):
            out.append(t.detach().reshape(-1)[idx.to(t.device)].cpu())
    return {"x": torch.cat(xs).double().numpy(), "y": torch.cat(ys).double().numpy(), "kept": torch.cat(ks).bool().numpy()}


def log_hist2d(x, y, kept, bins: int = 40) -> dict[str, Any]:
    """A 2-D histogram on log-spaced bins of the positive pairs ``(x, y)``: ``counts`` and ``kept``
    (how many of them the mask keeps) per bin, the edges, ``n`` (pairs binned) and ``left_out`` (pairs
    with a value <= 0 or non-finite, which a log axis cannot show)."""
    x, y, kept = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), np.asarray(kept, dtype=bool)
    if not x.shape == y.shape == kept.shape or x.ndim != 1:
        raise ValueError(f"x, y and kept must be 1-D of one length; got {x.shape}, {y.shape}, {kept.shape}")
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y, kept = x[ok], y[ok], kept[ok]

    def edges(v):
        low, high = (float(v.min()), float(v.max())) if v.size else (1.0, 1.0)
        if high <= low * (1 + 1e-9):  # one value (or none): a decade around it
            low, high = low / 10 ** 0.5, high * 10 ** 0.5
        return np.logspace(np.log10(low), np.log10(high), bins + 1)

    x_edges, y_edges = edges(x), edges(y)
    counts = np.histogram2d(x, y, bins=(x_edges, y_edges))[0].astype(np.int64)
    kept_counts = np.histogram2d(x[kept], y[kept], bins=(x_edges, y_edges))[0].astype(np.int64)
    return {"x_edges": x_edges, "y_edges": y_edges, "counts": counts, "kept": kept_counts, "n": int(x.size),
            "left_out": int((~ok).sum())}


def block_kind_figure(blocks: Sequence[Optional[int]], kinds: Sequence[str], grid: np.ndarray,
                      per_block: Sequence[float], overall: float, title: str, label: str,
                      reference: Optional[tuple[str, float]] = None):
    """Heatmap of a value in [0, 1] per decoder block (rows) and module kind (columns), next to its
    per-block curve with the overall value dashed (and an optional ``(label, value)`` reference line).
    ``grid`` is ``len(blocks) x len(kinds)``, NaN where a block has no matrix of that kind."""
    fig = new_figure(ncols=2, width=max(10.0, 0.6 * len(kinds) + 6))
    ax_map, ax_blk = fig.axes
    im = ax_map.imshow(grid, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax_map.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax_map.set_yticks(range(len(blocks)), ["-" if b is None else str(b) for b in blocks])
    ax_map.set(xlabel="module kind", ylabel="block")
    fig.colorbar(im, ax=ax_map, label=label)
    if per_block:
        ax_blk.plot(list(blocks), list(per_block), marker="o")
    ax_blk.axhline(overall, color="gray", linestyle="--", label="overall")
    if reference is not None:
        ax_blk.axhline(reference[1], color="tab:red", linestyle=":", label=reference[0])
    ax_blk.set(ylim=(0.0, 1.0), xlabel="block", ylabel=label)
    from matplotlib.ticker import MaxNLocator  # blocks are whole numbers

    ax_blk.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_blk.legend()
    fig.suptitle(title)
    return fig


def hist2d_figure(hist: Mapping[str, Any], title: str, xlabel: str, ylabel: str):
    """Two log-log panels of a :func:`log_hist2d` result: how many sampled
    weights fall in each bin (log colour), and the share of them the masks keep."""
    from matplotlib.colors import LogNorm

    fig = new_figure(ncols=2, width=11.0)
    ax_n, ax_k = fig.axes
    x, y, counts, kept = hist["x_edges"], hist["y_edges"], hist["counts"], hist["kept"]
    shown = np.ma.masked_where(counts == 0, counts)
    im = ax_n.pcolormesh(x, y, shown.T, norm=LogNorm(vmin=1, vmax=max(1, int(counts.max()))), cmap="viridis")
    fig.colorbar(im, ax=ax_n, label="sampled weights")
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.ma.masked_where(counts == 0, kept / counts)
    im = ax_k.pcolormesh(x, y, share.T, vmin=0.0, vmax=1.0, cmap="coolwarm_r")
    fig.colorbar(im, ax=ax_k, label="share kept")
    for ax, what in ((ax_n, "weights per bin"), (ax_k, "kept (blue) vs pruned (red)")):
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=what)
    left_out = f", {hist['left_out']} non-positive left out" if hist.get("left_out") else ""
    fig.suptitle(f"{title} ({hist['n']} sampled weights{left_out})")
    return fig

