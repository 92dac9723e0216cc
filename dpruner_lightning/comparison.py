"""``dpruner compare`` and ``dpruner sweep``: the dense model and several pruning runs on the same model,
the same calibration and evaluation data, and the same protocol.

A compare/sweep config is an ordinary fit config (``model`` / ``data`` / ``trainer`` sections, validated
by the same LightningCLI parser as ``dpruner fit``) plus one section of its own::

    compare:
      methods: [dense, magnitude, wanda, sparsegpt, llm_pruner,
                {name: d_pruner_obs, class_path: dpruner_lightning.methods.DPrunerMethod, init_args: {general_estimator: obs}}]
      output_dir: runs/compare_smoke
      tasks:                                # optional: domain tasks every row (dense too) is scored on
        - {name: pubmedqa, path: ../shared/data/pubmedqa_test_500.jsonl, limit: 100}
        - {name: billsum, path: ../shared/data/billsum_test_200.jsonl, limit: 20, max_new_tokens: 64}
        - {name: pubmed_title, n: 200, seed: 0}   # leaves out the run's calibration documents
    sweep:
      sparsities: [0.1, 0.3, 0.5]
      methods: [magnitude, d_pruner]        # default: the config's own model.method
      lambda_values: [0.01, 0.1]            # optional grid, D-PRUNER rows only
      alpha_values: [0.0, 0.0003]

A method entry is a registered name (:data:`~dpruner_lightning.methods.METHODS`), ``dense``, or
``{name, class_path?, init_args?, mask?}`` (``mask`` overrides ``model.mask`` for that row). Every row
is instantiated (so validated) before anything runs. The data are tokenised once and the same
datamodule serves every row; each row loads the dense model afresh, runs ``fit`` + ``validate`` like
``dpruner fit`` in its own log directory ``<output_dir>/<row>/`` (without the per-epoch validation: the
dense perplexity is the ``dense`` row's), then scores the row's model on each ``tasks`` entry
(presets and keys: :mod:`tasks`; columns ``task_<name>`` and ``tasks``), and the table lands in
``<output_dir>/comparison.{md,json}`` (``sweep.{md,json}``) and in TensorBoard as text. Columns and formulas: :mod:`comparison_report`.

The brief's Python API on the same functions, :class:`~dpruner_lightning.benchmark.BenchmarkSuite` and
:class:`~dpruner_lightning.benchmark.ExperimentRunner`, lives in :mod:`benchmark` (also importable from here).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import yaml

from .algorithms.masks import parse_granularity, realised_sparsity
from .comparison_report import PeakMemory, compression_ratio, generate_comparison_report, release_memory, write_results
from .data import CalibrationDataModule
from .methods import METHODS, DPrunerMethod, method_class
from .tasks import TaskSpec, build_task, calibration_texts, evaluate_task, parse_task_specs

log = logging.getLogger(__name__)

EXTRA_SECTIONS = ("compare", "sweep")
DENSE = "dense"
_COMPARE_KEYS = {"methods", "output_dir", "save_artifacts", "title", "tasks"}
_SWEEP_KEYS = _COMPARE_KEYS | {"sparsities", "lambda_values", "alpha_values", "include_dense"}

__all__ = ["generate_comparison_report", "load_config", "run_subcommand", "validate_config"]


def __getattr__(name: str) -> Any:
    """The API classes live in :mod:`benchmark` (which imports this module); import them lazily."""
    if name in ("BenchmarkSuite", "ExperimentRunner"):
        from . import benchmark

        return getattr(benchmark, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Row:
    """One line of the table: a label, the ``model.method`` value (None: the dense model), overrides of
    ``model.mask``, and extra columns (a sweep's sparsity / lambda / alpha)."""

    label: str
    method: Optional[dict]
    mask: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


# -- configs -----------------------------------------------------------------------------------------
def split_config(path: str | Path) -> tuple[dict, dict]:
    """``(fit config, {section: value})`` of a YAML file; the extra sections are popped from the first."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping")
    return raw, {k: raw.pop(k) for k in EXTRA_SECTIONS if k in raw}


def instantiate(config: dict, what: str = "config"):
    """Validate and instantiate a fit config with the machinery of ``dpruner fit`` (no run)."""
    from .cli import DPrunerCLI

    try:
        with warnings.catch_warnings():  # args given as a dict, on purpose: sys.argv is the compare command's
            warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
            return DPrunerCLI(args=copy.deepcopy(config), run=False, parser_kwargs={"exit_on_error": False})
    except (argparse.ArgumentError, ValueError, TypeError) as err:
        raise ValueError(f"{what} is invalid: {err}") from err


def load_config(path: str | Path) -> tuple[Any, dict]:
    """``(DPrunerCLI with model/datamodule/trainer instantiated, extra sections)`` of any config file."""
    base, extras = split_config(path)
    return instantiate(base, str(path)), extras


def validate_config(path: str | Path) -> dict[str, list[Row]]:
    """Parse a config and instantiate its fit part and every row of its compare/sweep sections (as
    ``run_rows`` does before computing anything); returns the rows by section. Nothing runs."""
    base, extras = split_config(path)
    instantiate(base, str(path))
    plans = {}
    for name, section in extras.items():
        section = dict(section or {})
        rows = compare_rows(section) if name == "compare" else sweep_rows(section, base)
        parse_task_specs(section.get("tasks"), f"{name}.tasks")
        for r in rows:
            instantiate(row_config(base, r, Path("runs/validate"), False), f"{path}: row {r.label!r}")
        plans[name] = rows
    return plans


def _model_section(config: dict) -> dict:
    model = config.setdefault("model", {}) or {}
    config["model"] = model
    return model.setdefault("init_args", {}) if "class_path" in model else model


def _resolve(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import method class {class_path!r}: {err}") from err


def method_entry(entry: Any) -> Row:
    """A ``methods`` list item (name or ``{name, class_path?, init_args?, mask?}``) as a :class:`Row`."""
    entry = {"name": entry} if isinstance(entry, str) else entry
    if not isinstance(entry, dict) or not entry.get("name"):
        raise ValueError(f"a method entry is a name or a mapping with a 'name'; got {entry!r}")
    unknown = set(entry) - {"name", "class_path", "init_args", "mask"}
    if unknown:
        raise ValueError(f"method entry {entry['name']!r}: unknown keys {sorted(unknown)} (use name, class_path, init_args, mask)")
    name = str(entry["name"])
    if name == DENSE:
        return Row(name, None)
    if entry.get("class_path"):
        class_path = entry["class_path"]
        _resolve(class_path)
    else:
        try:
            class_path = f"dpruner_lightning.methods.{method_class(name).__name__}"
        except ValueError as err:
            raise ValueError(f"{err}, {DENSE!r}, or give a class_path") from None
    return Row(name, {"class_path": class_path, "init_args": dict(entry.get("init_args") or {})}, dict(entry.get("mask") or {}))


def _check_keys(section: dict, allowed: set, what: str) -> None:
    unknown = set(section) - allowed
    if unknown:
        raise ValueError(f"unknown keys in the {what!r} section: {sorted(unknown)}; allowed: {sorted(allowed)}")


def _unique(rows: list[Row]) -> list[Row]:
    labels = [r.label for r in rows]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"duplicate row names {dup}: give each method entry its own name")
    return rows


def compare_rows(section: dict) -> list[Row]:
    """Rows of a ``compare`` section (default methods: dense + every registered method)."""
    _check_keys(section, _COMPARE_KEYS, "compare")
    methods = section.get("methods", [DENSE, *METHODS])
    if not methods:
        raise ValueError("compare.methods is empty: list at least one method (e.g. [dense, magnitude, wanda])")
    return _unique([method_entry(m) for m in methods])


def _values(section: dict, key: str, low: float, high: float = float("inf")) -> list[float]:
    values = section.get(key)
    if values is None:
        return []
    if not isinstance(values, list) or not values:
        raise ValueError(f"sweep.{key} must be a non-empty list of numbers; got {values!r}")
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v < high]
    if bad or len(set(values)) != len(values):
        raise ValueError(f"sweep.{key} needs distinct numbers in [{low}, {high}); got {values!r}")
    return [float(v) for v in values]


def sweep_rows(section: dict, base: dict) -> list[Row]:
    """Rows of a ``sweep`` section: every method at every sparsity (D-PRUNER rows: every lambda x alpha)."""
    _check_keys(section, _SWEEP_KEYS, "sweep")
    sparsities = _values(section, "sparsities", 0.0, 1.0)
    if not sparsities:
        raise ValueError("sweep.sparsities is required, e.g. [0.1, 0.3, 0.5]")
    lambdas, alphas = _values(section, "lambda_values", 0.0), _values(section, "alpha_values", 0.0)
    base_model = _model_section(copy.deepcopy(base))
    own = base_model.get("method")
    default = {"name": "d_pruner"} if own is None else {"name": "method", **({"class_path": own} if isinstance(own, str) else own)}
    entries = [method_entry(m) for m in (section.get("methods") or [default])]
    if any(e.method is None for e in entries):
        raise ValueError("sweep.methods lists 'dense': the dense row is added by include_dense (default true)")
    is_dpruner = {e.label: issubclass(_resolve(e.method["class_path"]), DPrunerMethod) for e in entries}
    if (lambdas or alphas) and not any(is_dpruner.values()):
        raise ValueError("sweep.lambda_values / alpha_values apply to D-PRUNER rows, but no method of the sweep is D-PRUNER")
    rows = [Row(DENSE, None)] if section.get("include_dense", True) else []
    for s in sparsities:
        for e in entries:
            grid = [(lam, a) for lam in (lambdas or [None]) for a in (alphas or [None])] if is_dpruner[e.label] else [(None, None)]
            for lam, a in grid:
                args = {k: v for k, v in (("lambda_reg", lam), ("alpha", a)) if v is not None}
                label = " ".join([e.label, f"s={s:g}", *(f"{k}={v:g}" for k, v in args.items())])
                method = {**e.method, "init_args": {**e.method["init_args"], **args}}
                mask = {**e.mask, "sparsity": s}
                granularity = {**(base_model.get("mask") or {}), **mask}.get("granularity", "auto")
                if granularity != "auto" and parse_granularity(granularity)[0] == "n:m":
                    raise ValueError(f"row {label!r}: an N:M granularity fixes the sparsity; a sparsity sweep needs another granularity")
                rows.append(Row(label, method, mask, {"sparsity_requested": s, **args}))
    return _unique(rows)


def row_config(base: dict, row: Row, output_dir: Path, save_artifacts: bool) -> dict:
    """The fit config of one row: its method and mask, and its own TensorBoard log directory."""
    config = copy.deepcopy(base)
    model = _model_section(config)
    # The dense row only validates; a data-free method keeps its instantiation free of constraints.
    model["method"] = row.method or {"class_path": "dpruner_lightning.methods.Magnitude"}
    if row.mask:
        model["mask"] = {**(model.get("mask") or {}), **row.mask}
    if not save_artifacts:  # seven exported 135M models are 3 GB nobody asked for
        model["output"] = {**(model.get("output") or {}), "save_importance": False, "save_masks": False, "export_model": False}
    trainer = config.get("trainer") or {}
    config["trainer"] = trainer
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", row.label)
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                         "init_args": {"save_dir": str(output_dir), "name": slug, "version": ""}}
    trainer["check_val_every_n_epoch"] = 10**9  # skip per-epoch validation: the dense row measures it once
    return config


# -- running ---------------------------------------------------------------------------------------
def _row_metrics(row: Row, module, trainer, seconds: float, memory: PeakMemory) -> dict:
    summary = module.summary
    if row.method is None:  # dense: measure, do not assume, the zeros it already has
        weights = {n: t.weight_view() for n, t in module.targets.items()}
        report = realised_sparsity(module.model, weights)
        realised = {"targets": report["targets"], "all_parameters": report["all_parameters"]}
        params = {"targets": report["target_parameters"], "all": report["all_parameter_count"]}
    else:
        realised, params = summary["sparsity_realised"], summary["parameters"]
    ppl = module.perplexities.get(module.stage, {})
    phases = {k: round(v, 3) for k, v in module.phase_seconds.items()}
    return {
        "method_repr": repr(module.method) if row.method else DENSE,
        "granularity": summary.get("granularity"),
        "sparsity_target": summary.get("sparsity_target", 0.0),
        "sparsity_targets": realised["targets"],
        "sparsity_all": realised["all_parameters"],
        "ppl_domain": ppl.get("domain"),
        "ppl_general": ppl.get("general"),
        "seconds_total": round(seconds, 3),
        "seconds_prune": round(sum(module.phase_seconds.values()), 3),
        "seconds_phases": phases,
        "peak_memory_bytes": memory.peak_bytes,
        "peak_memory_delta_bytes": memory.peak_bytes - memory.start_bytes,
        "peak_memory_mib": memory.peak_bytes / 2**20,
        "peak_memory_kind": memory.kind,
        "compression_ratio": compression_ratio(module),
        "parameters": params,
        "structured": summary.get("structured"),
        "log_dir": trainer.log_dir,
    }


def build_tasks(specs: Sequence[TaskSpec], datamodule: CalibrationDataModule) -> list[tuple[TaskSpec, Any]]:
    """Every task of ``compare.tasks`` with its records loaded, once for all rows; a title task leaves
    out the documents of the datamodule's calibration sources."""
    exclude = calibration_texts(datamodule) if any(s.preset == "pubmed_title" for s in specs) else []
    return [(spec, build_task(spec, exclude)) for spec in specs]


def _task_metrics(module, tasks: Sequence[tuple[TaskSpec, Any]]) -> dict:
    """``task_<name>`` (headline score), ``tasks`` (all metrics per task) and their seconds."""
    if not tasks:
        return {}
    t0, out, columns = time.perf_counter(), {}, {}
    for spec, task in tasks:
        log.info("task %s", spec.name)
        metrics = evaluate_task(module.model, module.tokenizer, task, max_length=spec.max_length)
        columns[f"task_{spec.name}"] = metrics["score"]
        out[spec.name] = metrics
    return {**columns, "tasks": out, "seconds_tasks": round(time.perf_counter() - t0, 3)}


def run_row(row: Row, cli, datamodule: CalibrationDataModule, seed: Optional[int],
            tasks: Sequence[tuple[TaskSpec, Any]] = ()) -> dict:
    """``fit`` (not for the dense row) then ``validate`` one row, then its tasks; failures become an
    ``error`` field (the metrics measured before the failure stay)."""
    module, trainer = cli.model, cli.trainer
    if isinstance(seed, int) and not isinstance(seed, bool):
        L.seed_everything(seed, verbose=False)
    result: dict = {"method": row.label, **row.info}
    log.info("=== %s ===", row.label)
    try:
        with PeakMemory() as memory:
            t0 = time.perf_counter()
            if row.method is not None:
                trainer.fit(module, datamodule=datamodule)
            trainer.validate(module, datamodule=datamodule, verbose=False)
            seconds = time.perf_counter() - t0
        result.update(_row_metrics(row, module, trainer, seconds, memory))
        result.update(_task_metrics(module, tasks))
    except Exception as err:  # one broken method must not lose the other rows of a long comparison
        log.exception("row %r failed", row.label)
        result["error"] = f"{type(err).__name__}: {err}"
    return result


def run_rows(base: dict, rows: Sequence[Row], output_dir: str | Path, stem: str, meta: dict,
             save_artifacts: bool = False, tasks: Sequence[TaskSpec] = ()) -> list[dict]:
    """Validate every row and load every task, then run the rows one by one on one shared datamodule;
    write the results."""
    output_dir = Path(output_dir)
    clis = [instantiate(row_config(base, r, output_dir, save_artifacts), f"row {r.label!r}") for r in rows]
    datamodule = clis[0].datamodule  # tokenised once (its setup is idempotent), shared by every row
    seed = clis[0].config.get("seed_everything")
    built = build_tasks(tasks, datamodule)
    meta = {**meta, "output_dir": str(output_dir), "rows_planned": [r.label for r in rows]}
    if built:
        meta["tasks"] = {spec.name: {"preset": spec.preset, "n": len(task.records), "max_length": spec.max_length,
                                     "source": spec.source.describe() if spec.source else "built-in"}
                         for spec, task in built}
    results: list[dict] = []
    for i, row in enumerate(rows):
        cli, clis[i] = clis[i], None
        results.append(run_row(row, cli, datamodule, seed, built))
        write_results(output_dir, stem, results, meta, tensorboard=False)  # partial results survive a crash
        # Free this row's model and method state before the next row loads its own: the shared
        # datamodule still points at this row's trainer (and so at its module).
        datamodule.trainer = None
        del cli
        release_memory()
    markdown = write_results(output_dir, stem, results, meta, tensorboard=True)
    log.info("results in %s:\n%s", output_dir, markdown)
    return results


def run_subcommand(name: str, argv: Sequence[str]) -> list[dict]:
    """``dpruner compare|sweep --config FILE [--output_dir DIR]``; raises if a row failed."""
    parser = argparse.ArgumentParser(prog=f"dpruner {name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a fit config with a top-level '%s:' section" % name)
    parser.add_argument("--output_dir", default=None, help="overrides the section's output_dir")
    args = parser.parse_args(list(argv))
    base, extras = split_config(args.config)
    if name not in EXTRA_SECTIONS or name not in extras:
        raise ValueError(f"{args.config} has no top-level '{name}:' section (expected one of {EXTRA_SECTIONS})")
    section = dict(extras[name] or {})
    rows = compare_rows(section) if name == "compare" else sweep_rows(section, base)
    tasks = parse_task_specs(section.get("tasks"), f"{name}.tasks")
    output_dir = Path(args.output_dir or section.get("output_dir") or f"runs/{name}_{Path(args.config).stem}")
    meta = {"title": section.get("title") or f"dpruner {name}: {Path(args.config).name}", "config": str(args.config)}
    results = run_rows(base, rows, output_dir, "comparison" if name == "compare" else "sweep", meta,
                       save_artifacts=bool(section.get("save_artifacts", False)), tasks=tasks)
    failed = [r["method"] for r in results if r.get("error")]
    if failed:
        raise RuntimeError(f"{len(failed)} row(s) failed: {failed}; see the log and {output_dir}")
    return results
