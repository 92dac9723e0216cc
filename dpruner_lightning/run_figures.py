"""What a prune logs to TensorBoard: the sparsity per matrix and overall (scalars), what was pruned
(text) and the run's images: the masks' sparsity and the share of the method's importance they keep, per
block and module kind, and D-PRUNER's G against S. Used by the mask callback and by re-pruning
(:mod:`reprune`: ``compare`` / ``sweep`` rows that share a fit).
"""

from __future__ import annotations

import logging
import time

from .analysis import MaskAnalyzer, block_kind_grid, importance_kept, importance_totals
from .figures import add_figure, block_kind_figure, hist2d_figure, log_hist2d, plotting_available, sample_pairs
from .methods import DPrunerMethod

log = logging.getLogger(__name__)


#: Weights sampled for the G-vs-S histogram, whatever the model's size (the cost is this many gathers).
PAIR_SAMPLES = 50_000


def importance_before(method) -> dict[str, float] | None:
    """Each matrix's total importance mass before the masks are applied (scores computed from the weights,
    as magnitude's and Wanda's are, lose the pruned part). None for a method without per-weight scores
    (SparseGPT chooses inside its solver; a structured method has no masks)."""
    if method.structured:
        return None
    try:
        return importance_totals(method.scores())
    except NotImplementedError:
        return None


def add_run_figures(writer, result, method=None, totals: dict[str, float] | None = None) -> list[str]:
    """What was pruned as text, and as images (returns their tags; step 0): the masks' sparsity and the
    share of ``method.scores()`` they keep (of ``totals``, :func:`importance_before`) per block and module
    kind, and D-PRUNER's G against S on :data:`PAIR_SAMPLES` seeded weights. Call before ``method.release()``."""
    lines = ["| | |", "|---|---|", f"| method | `{result.method_repr}` |", f"| granularity | {result.granularity} |",
             f"| sparsity requested | {result.sparsity_target:.4f} |",
             f"| sparsity realised (targets / all parameters) | {result.sparsity_realised['targets']:.4f} / "
             f"{result.sparsity_realised['all_parameters']:.4f} |"]
    writer.add_text("run/summary", "\n".join(lines), 0)
    if not result.masks or not plotting_available():  # no masks: structured; no matplotlib: said once
        return []
    try:
        return _run_images(writer, result, method, totals)
    except Exception:  # a picture must not cost a finished prune its artifacts (written right after this)
        log.warning("TensorBoard figures of %s failed; the masks and exports are not affected", result.method, exc_info=True)
        return []


def _run_images(writer, result, method, totals: dict[str, float] | None) -> list[str]:
    t0, tags = time.perf_counter(), ["masks/sparsity_by_block_and_kind"]
    add_figure(writer, tags[-1], MaskAnalyzer.mask_distribution_figure(result.masks, f"{result.method}: mask sparsity"))
    if method is not None and totals is not None:
        scores = method.scores()
        if method.reconstruct != "none" and importance_totals(scores) != totals:
            log.info("importance-kept figure skipped: %s's scores follow the weights, which reconstruct=%r re-solved",
                     result.method, method.reconstruct)
        else:
            stats = importance_kept(scores, result.masks, totals)
            writer.add_scalar("importance/kept_share", stats["overall"]["share"], 0)
            tags.append("importance/kept_by_block_and_kind")
            add_figure(writer, tags[-1], block_kind_figure(
                *block_kind_grid(stats, "share"), title=f"{result.method}: share of the importance the masks keep",
                label="importance kept", reference=("weights kept", 1.0 - result.sparsity_realised["targets"])))
    if isinstance(method, DPrunerMethod) and method.general and method.dual:
        pairs = sample_pairs(method.general, method.dual, result.masks, PAIR_SAMPLES, seed=0)
        tags.append("importance/general_vs_dual")
        hist = log_hist2d(pairs["x"], pairs["y"], pairs["kept"])
        add_figure(writer, tags[-1], hist2d_figure(hist, f"{result.method}: G vs S", "G (general importance)", "S (dual importance)"))
    log.debug("TensorBoard figures %s drawn in %.2f s", tags, time.perf_counter() - t0)
    return tags


def log_pruning(writer, result, method=None, totals: dict[str, float] | None = None) -> list[str]:
    """Sparsity per matrix and overall as scalars, then :func:`add_run_figures`; returns the image tags."""
    for i, (name, s) in enumerate(result.per_matrix.items()):
        writer.add_scalar(f"sparsity/{name}", s, 0)
        writer.add_scalar("sparsity/by_target_index", s, i)
    writer.add_scalar("sparsity/targets", result.sparsity_realised["targets"], 0)
    writer.add_scalar("sparsity/all_parameters", result.sparsity_realised["all_parameters"], 0)
    return add_run_figures(writer, result, method, totals)
