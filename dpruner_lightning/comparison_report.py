"""Measurements and reports of ``dpruner compare`` / ``sweep``: peak memory, compression ratio, the
markdown table, and the files written (``<stem>.md``, ``<stem>.json``, TensorBoard text).

Task columns (``compare.tasks``): one per task, headed ``<task> <metric>`` (``acc``, ``acc_per_token``,
``acc_norm`` = per character as lm-eval's, ``acc_cal`` or ``ROUGE-L``), each cell the headline score and its bootstrap 95% interval over the
task's items, ``0.452 [0.36, 0.55]``; every metric is in the JSON row's ``tasks``.

Compression ratio (see :func:`compression_ratio`): dense parameter bytes divided by the bytes of a
storage that actually exploits the pruning:

* unstructured (masks): every target matrix stored as a bitmask (1 bit per original weight) plus its
  non-zero values in the model's dtype; every other parameter dense. At 50% on fp32 targets this is
  4 / (0.125 + 2) = 1.88x on the targets (bf16: 2 / 1.125 = 1.78x);
* structured (shapes shrank): dense parameter count / remaining parameter count;
* the dense model: 1.0.

Peak memory: the largest of the row's per-phase peaks (passes, masks, validation), measured by
:class:`~dpruner_lightning.memory.PeakMemory` (its docstring says what each ``peak_memory_kind`` is).

Seconds: ``seconds_prune`` sums the row's phases (passes and masks), ``seconds_total`` is fit plus
validate. A row that reused another row's passes (``passes_from``) counts only its masks and
validation; ``seconds_passes_shared`` holds the passes' time and the table says which rows shared it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch

from .algorithms.masks import realised_sparsity
from .export import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


@torch.no_grad()
def compression_ratio(module) -> float:
    """Dense bytes / bytes of a storage exploiting the pruning (formula in the module docstring)."""
    params = list(module.model.parameters())
    if module.method.structured:
        return module.dense.parameters["all"] / max(1, sum(p.numel() for p in params))
    if not module.pruned:
        return 1.0
    dense_bytes = sum(p.numel() * p.element_size() for p in params)
    target_ids = {id(t.weight) for t in module.targets.values()}
    other = sum(p.numel() * p.element_size() for p in params if id(p) not in target_ids)
    sparse = sum(math.ceil(t.weight.numel() / 8) + int(t.weight.count_nonzero()) * t.weight.element_size()
                 for t in module.targets.values())
    return dense_bytes / max(1, other + sparse)


def row_metrics(row, module, trainer, seconds: float) -> dict:
    """A run row's columns (sparsity, perplexities, seconds, peak memory, compression) from its module."""
    result = module.result
    if result is None:  # dense: measure, do not assume, the zeros it already has
        weights = {n: t.weight_view() for n, t in module.targets.items()}
        report = realised_sparsity(module.model, weights)
        realised = {"targets": report["targets"], "all_parameters": report["all_parameters"]}
        params = {"targets": report["target_parameters"], "all": report["all_parameter_count"]}
    else:
        realised, params = result.sparsity_realised, result.parameters
    ppl = module.perplexities.get(module.stage, {})
    phases = {k: round(v, 3) for k, v in module.phase_seconds.items()}
    peak = max(module.peak_memory.values(), default=0)
    return {
        "method_repr": repr(module.method) if row.method else "dense",
        "granularity": result.granularity if result else None,
        "sparsity_target": result.sparsity_target if result else 0.0,
        "sparsity_targets": realised["targets"],
        "sparsity_all": realised["all_parameters"],
        "ppl_domain": ppl.get("domain"),
        "ppl_general": ppl.get("general"),
        "seconds_total": round(seconds, 3),
        "seconds_prune": round(sum(module.phase_seconds.values()), 3),
        "seconds_phases": phases,
        "peak_memory_bytes": peak,
        "peak_memory_by_phase": dict(module.peak_memory),
        "peak_memory_mib": peak / 2**20,
        "peak_memory_kind": module.peak_memory_kind,
        "compression_ratio": compression_ratio(module),
        "parameters": params,
        "structured": result.structured if result else None,
        "log_dir": trainer.log_dir,
    }


COLUMNS = (
    ("method", "Method", "{}"),
    ("sparsity_targets", "Sparsity (targets)", "{:.3f}"),
    ("sparsity_all", "Sparsity (all params)", "{:.3f}"),
    ("ppl_domain", "PPL domain", "{:.2f}"),
    ("ppl_general", "PPL general", "{:.2f}"),
    ("seconds_prune", "Prune s", "{:.2f}"),
    ("seconds_total", "Total s", "{:.1f}"),
    ("peak_memory_mib", "Peak MiB", "{:.0f}"),
    ("compression_ratio", "Compression", "{:.2f}x"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


#: Headers of the headline metrics (evaluation.py): only the per-character accuracy is lm-eval's acc_norm.
_METRIC_NAMES = {"accuracy": "acc", "accuracy_per_token": "acc_per_token", "accuracy_per_char": "acc_norm",
                 "accuracy_calibrated": "acc_cal", "rougeL": "ROUGE-L",
                 "accuracy_norm": "acc_per_token"}  # rows saved before the rename: the per-token accuracy


def _task_columns(results: list[dict]) -> list[tuple[str, str]]:
    """``(task name, header)`` of every task some row was scored on, in first-seen order."""
    columns: dict[str, str] = {}
    for row in results:
        for name, metrics in (row.get("tasks") or {}).items():
            metric = metrics.get("score_metric", "score")
            columns.setdefault(name, f"{name} {_METRIC_NAMES.get(metric, metric)}")
    return list(columns.items())


def _task_cell(metrics: Optional[dict]) -> str:
    """Headline score with its bootstrap 95% interval: ``0.452 [0.36, 0.55]``."""
    if not metrics or metrics.get("score") is None:
        return "-"
    ci = metrics.get("score_ci")
    return f"{metrics['score']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _shared_passes_note(results: list[dict]) -> list[str]:
    """One line naming the rows that reused another row's calibration passes (see :mod:`comparison`)."""
    reused: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for row in results:
        if row.get("passes_from") and not row.get("error"):
            reused.setdefault(row["passes_from"], []).append(row["method"])
            seconds[row["passes_from"]] = row.get("seconds_passes_shared", 0.0)
    if not reused:
        return []
    groups = "; ".join(f"{', '.join(rows)} reused those of {leader} ({seconds[leader]:.1f} s)" for leader, rows in reused.items())
    return [f"Calibration passes run once per method and settings, at the first sparsity, and reused by the other "
            f"sparsities, whose Prune s and Total s leave them out: {groups}."]


def generate_comparison_report(results: list[dict], title: Optional[str] = None) -> str:
    """A markdown table with one line per result row (failed rows show their error) and one column
    per evaluated task."""
    tasks = _task_columns(results)
    headers = [h for _, h, _ in COLUMNS] + [h for _, h in tasks]
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for row in results:
        if row.get("error"):
            lines.append(f"| {row['method']} | failed: {str(row['error']).splitlines()[0][:120]} |" + " |" * (len(headers) - 2))
            continue
        cells = [_cell(row.get(k), f) for k, _, f in COLUMNS] + [_task_cell((row.get("tasks") or {}).get(n)) for n, _ in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    kinds = sorted({r.get("peak_memory_kind") for r in results if r.get("peak_memory_kind")})
    lines += ["", f"Sparsity of LLM-Pruner = fraction of parameters removed. Peak memory: {', '.join(kinds) or 'n/a'}."]
    lines += _shared_passes_note(results)
    if tasks:
        sizes = {n: m.get("n") for r in results for n, m in (r.get("tasks") or {}).items()}
        lines.append("Tasks: score [bootstrap 95% interval over items]; items: "
                     + ", ".join(f"{n} {sizes.get(n)}" for n, _ in tasks) + ".")
    return "\n".join(lines) + "\n"


def write_results(output_dir: Path, stem: str, rows: list[dict], meta: dict, tensorboard: bool = True,
                  masks: Optional[dict] = None) -> str:
    """Write ``<stem>.json`` and ``<stem>.md`` atomically (and to TensorBoard the table as text and the
    figures of :func:`~dpruner_lightning.comparison_figures.log_comparison_figures`: perplexity vs.
    sparsity, and the overlap of ``masks``, ``{row: PackedMasks}``); returns the markdown. While rows
    are missing (``meta['rows_planned']``), the title says "k of N rows"."""
    planned = meta.get("rows_planned") or []
    done = {r.get("method") for r in rows}
    title = meta.get("title") or ""
    if planned and not set(planned) <= done:
        title = f"{title} (partial: {len(set(planned) & done)} of {len(planned)} rows)".strip()
    markdown = generate_comparison_report(rows, title=title or None)
    atomic_write_json(output_dir / f"{stem}.json", {**meta, "rows": rows})
    atomic_write_text(output_dir / f"{stem}.md", markdown)
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        from .comparison_figures import log_comparison_figures

        with SummaryWriter(log_dir=str(output_dir)) as writer:  # one event file: text and figures
            writer.add_text(stem, markdown, 0)
            log_comparison_figures(writer, rows, masks, prefix=stem)
    return markdown
