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

Shared passes: rows whose resolved configs differ only in ``model.mask.sparsity`` (a sweep's levels of
one method with the same hyperparameters, data and model) run their calibration passes once. The
first of them runs ``fit`` as usual; the others restore the weights and method state from just before
that fit's masks and prune at their own sparsity (:mod:`reprune`: the same masks and weights as a
separate run), then validate in their own log directory. Their ``seconds_*`` leave the shared passes
out; ``passes_from`` names the row that ran them and ``seconds_passes_shared`` says how long they took
(the table notes it too). Rows of a group run one after the other (one fitted model held at a time);
the table keeps the planned order. Several processes: every row runs its own passes.

Restarts: every row is keyed by a hash of its resolved config (and the tasks). A restart into the same
``output_dir`` keeps the rows already finished there (they are not run again), re-runs failed or
missing ones, and refuses a row whose name was run with another config; while rows are missing, the
table's title says "k of N rows". A group whose first row is kept runs its passes again for the rest.

Progress: a log line per row (``row 3/12: <label>``) and, on a terminal, Lightning's progress bar per
row (``trainer.enable_progress_bar`` defaults to whether stderr is a terminal).

The Python API on the same functions, :class:`~dpruner_lightning.benchmark.BenchmarkSuite` and
:class:`~dpruner_lightning.benchmark.ExperimentRunner`, lives in :mod:`benchmark`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import yaml

from .callbacks import run_dir, tensorboard
from .comparison_figures import PackedMasks, pack_masks, packed_masks_of_saved_rows
from .comparison_report import generate_comparison_report, row_metrics, write_results
from .comparison_rows import (
    DENSE,
    Row,
    _model_section,
    compare_rows,
    execution_order,
    finished_rows,
    in_table_order,
    pass_group_config,
    row_folder,
    row_key,
    row_method,  # noqa: F401  (re-exported: the row planning used to live here)
    sweep_rows,
)
from .data import CalibrationDataModule
from .lightning_cli import DPrunerCLI
from .memory import release_memory
from .pruning import save_artifacts
from .reprune import PruneSnapshot, SnapshotBeforePruning, prune_again
from .run_figures import importance_before, log_pruning
from .rundir import claim_run_dir, release_lock
from .tasks import TaskSpec, build_task, calibration_texts, evaluate_task, parse_task_specs

log = logging.getLogger(__name__)

EXTRA_SECTIONS = ("compare", "sweep")

__all__ = ["generate_comparison_report", "load_config", "run_subcommand", "validate_config"]


# -- configs -----------------------------------------------------------------------------------------
def split_config(path: str | Path) -> tuple[dict, dict]:
    """``(fit config, {section: value})`` of a YAML file; the extra sections are popped from the first."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping")
    return raw, {k: raw.pop(k) for k in EXTRA_SECTIONS if k in raw}


def instantiate(config: dict, what: str = "config"):
    """Validate and instantiate a fit config with the machinery of ``dpruner fit`` (no run)."""
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


#: Rows skip the per-epoch validation during fit: the dense row measures the dense model once.
NO_EPOCH_VALIDATION = 10**9


def progress_bars() -> bool:
    """Whether rows show Lightning's progress bar by default: on a terminal only (what tqdm's
    ``disable=None`` decides), so logs and CI output get one line per row instead."""
    return sys.stderr.isatty()


def row_config(base: dict, row: Row, output_dir: Path, save_artifacts: bool) -> dict:
    """The fit config of one row: its method and mask, and its own TensorBoard log directory."""
    config = copy.deepcopy(base)
    model = _model_section(config)
    # The dense row only validates; a data-free method keeps its instantiation free of constraints.
    model["method"] = row.method or {"class_path": "dpruner_lightning.methods.MagnitudeMethod"}
    if row.mask:
        model["mask"] = {**(model.get("mask") or {}), **row.mask}
    # The row folders belong to this comparison: an unfinished row of an earlier attempt is replaced.
    model["output"] = {**(model.get("output") or {}), "overwrite": True}
    if not save_artifacts:  # seven exported 135M models are 3 GB nobody asked for
        model["output"].update(save_importance=False, save_masks=False, export_model=False)
    trainer = config.get("trainer") or {}
    config["trainer"] = trainer
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                         "init_args": {"save_dir": str(output_dir), "name": row_folder(row), "version": ""}}
    trainer["check_val_every_n_epoch"] = NO_EPOCH_VALIDATION
    trainer.setdefault("enable_model_summary", False)  # one summary per row said nothing the table does not
    trainer.setdefault("enable_progress_bar", progress_bars())
    return config


# -- running ---------------------------------------------------------------------------------------
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


@dataclass
class RowRun:
    """One row, instantiated and ready to run: its module, its trainer (own log directory) and the key
    of its resolved configuration (restarts match finished rows by it)."""

    module: Any
    trainer: L.Trainer
    key: str
    group: Optional[str] = None
    """Rows with the same group share their calibration passes (None: the row runs its own)."""


@dataclass
class SharedPasses:
    """A fitted row whose calibration passes the next rows of its group reuse."""

    module: Any
    snapshot: PruneSnapshot
    label: str
    seconds: float
    """The passes' seconds (the first row's phases but its masks)."""


def _seed(seed: Optional[int]) -> None:
    if isinstance(seed, int) and not isinstance(seed, bool):
        L.seed_everything(seed, verbose=False)


def run_row(row: Row, run: RowRun, datamodule: CalibrationDataModule, seed: Optional[int],
            tasks: Sequence[tuple[TaskSpec, Any]] = (), snapshot: Optional[SnapshotBeforePruning] = None) -> dict:
    """``fit`` (not for the dense row) then ``validate`` one row, then its tasks; failures become an
    ``error`` field (the metrics measured before the failure stay). ``snapshot``: a callback that keeps
    the state before the masks, for the rows that reuse this fit."""
    module, trainer = run.module, run.trainer
    _seed(seed)
    result: dict = {"method": row.label, **row.info}
    try:
        t0 = time.perf_counter()
        if row.method is not None:
            module.configure_trainer(trainer)
            if snapshot is not None:
                trainer.callbacks.append(snapshot)
            trainer.fit(module, datamodule=datamodule)
        trainer.validate(module, datamodule=datamodule, verbose=False)
        seconds = time.perf_counter() - t0
        result.update(row_metrics(row, module, trainer, seconds))
        result.update(_task_metrics(module, tasks))
    except Exception as err:  # one broken method must not lose the other rows of a long comparison
        log.exception("row %r failed", row.label)
        result["error"] = f"{type(err).__name__}: {err}"
    return result


def run_row_again(row: Row, run: RowRun, shared: SharedPasses, datamodule: CalibrationDataModule, seed: Optional[int],
                  tasks: Sequence[tuple[TaskSpec, Any]] = ()) -> dict:
    """A row that differs from the fitted row ``shared.label`` only in sparsity: masks at this row's mask
    spec from that fit's passes (:func:`~dpruner_lightning.reprune.prune_again`), written to this row's
    own log directory, then ``validate`` and the tasks; failures become an ``error`` field."""
    module, trainer = shared.module, run.trainer
    _seed(seed)
    result: dict = {"method": row.label, **row.info}
    folder = None
    try:
        t0 = time.perf_counter()
        module.perplexities, module.phase_seconds, module.peak_memory, module.artifacts = {}, {}, {}, {}
        folder = run_dir(trainer)
        claim_run_dir(folder, module.output.overwrite)  # before writing: clears an earlier attempt's files first
        writer = tensorboard(trainer)
        before: dict = {}  # the importance before the masks zero any weight (kept-importance figure)
        measure = (lambda m: before.update(totals=importance_before(m.method))) if writer is not None else None
        pruned = prune_again(module, run.module.mask_spec, shared.snapshot, on_restored=measure)
        if writer is not None:
            log_pruning(writer, pruned, module.method, before.get("totals"))
        module.artifacts.update(save_artifacts(folder, pruned, module.model, module.tokenizer, module.method, module.output))
        trainer.validate(module, datamodule=datamodule, verbose=False)
        result.update(row_metrics(row, module, trainer, time.perf_counter() - t0))
        result.update(passes_from=shared.label, seconds_passes_shared=round(shared.seconds, 3))
        result.update(_task_metrics(module, tasks))
    except Exception as err:  # as run_row: one broken row must not lose the others
        log.exception("row %r failed", row.label)
        result["error"] = f"{type(err).__name__}: {err}"
        if folder is not None:
            release_lock(folder)
    return result


def cli_rows(base: dict, rows: Sequence[Row], output_dir: Path, save_artifacts: bool,
             tasks: Sequence[TaskSpec] = ()) -> tuple[list[RowRun], CalibrationDataModule, Optional[int]]:
    """Every row of a YAML config instantiated by the ``dpruner fit`` parser (so validated), the
    datamodule they share and the seed."""
    configs = [row_config(base, r, output_dir, save_artifacts) for r in rows]
    clis = [instantiate(c, f"row {r.label!r}") for c, r in zip(configs, rows)]
    runs = [RowRun(cli.model, cli.trainer, row_key(c, tasks), row_key(pass_group_config(c)) if r.method is not None else None)
            for cli, c, r in zip(clis, configs, rows)]
    return runs, clis[0].datamodule, clis[0].config.get("seed_everything")


def run_rows(rows: Sequence[Row], runs: list[RowRun], datamodule: CalibrationDataModule, seed: Optional[int],
             output_dir: str | Path, stem: str, meta: dict, tasks: Sequence[TaskSpec] = ()) -> list[dict]:
    """Load every task, then run the rows on the one shared datamodule (tokenised once); rows finished in
    an earlier run into ``output_dir`` are kept, not run again; rows of one pass group share one fit
    (module docstring). Writes the results, in the planned order, after every row."""
    output_dir = Path(output_dir)
    results, done = finished_rows(output_dir / f"{stem}.json", rows, [r.key for r in runs])
    built = build_tasks(tasks, datamodule) if len(done) < len(rows) else []
    meta = {**meta, "output_dir": str(output_dir), "rows_planned": [r.label for r in rows]}
    if built:
        meta["tasks"] = {spec.name: {"preset": spec.preset, "n": len(task.records), "max_length": spec.max_length,
                                     "source": spec.source.describe() if spec.source else "built-in"}
                         for spec, task in built}
    for row in rows:
        if row.label in done:
            log.info("row %r finished in an earlier run of %s: kept", row.label, output_dir)
    todo = [i for i, row in enumerate(rows) if row.label not in done]
    # Every row's masks, 1 bit per weight (sampled rows past 2**24 weights), for the overlap figure; rows
    # kept from an earlier run bring theirs only if they saved them (save_artifacts).
    masks: dict[str, PackedMasks] = packed_masks_of_saved_rows(results, done)
    groups = [run.group if run.trainer.world_size == 1 else None for run in runs]  # DDP: every row fits
    count = 0
    for batch in execution_order(groups, todo):
        shared: Optional[SharedPasses] = None
        for position, i in enumerate(batch):
            row, run, runs[i] = rows[i], runs[i], None
            count += 1
            log.info("row %d/%d: %s%s", count, len(todo), row.label, f" (passes of {shared.label!r})" if shared else "")
            results = [r for r in results if r.get("method") != row.label]  # an earlier failed attempt
            if shared is None:
                catcher = SnapshotBeforePruning() if position < len(batch) - 1 else None
                result = run_row(row, run, datamodule, seed, built, catcher)
                if catcher is not None and catcher.snapshot is not None:
                    passes = sum(v for k, v in run.module.phase_seconds.items() if k != "mask")
                    shared = SharedPasses(run.module, catcher.snapshot, row.label, passes)
                    catcher.snapshot = None  # the group holds it now, and frees it when its last row is done
            else:
                result = run_row_again(row, run, shared, datamodule, seed, built)
            results.append({**result, "config_key": run.key})
            pruned_by = shared.module if result.get("passes_from") else run.module
            if not result.get("error") and pruned_by.result is not None and pruned_by.result.masks:
                masks[row.label] = pack_masks(pruned_by.result.masks)
            write_results(output_dir, stem, in_table_order(results, rows), meta, tensorboard=False)  # survives a crash
            # The shared datamodule still points at this row's trainer (and so at its module).
            datamodule.trainer = None
            del run
            if shared is None:  # free this row's model and method state before the next row loads its own
                release_memory()
        if shared is not None:
            shared.module.method.release()
            shared = None
            release_memory()
    results = in_table_order(results, rows)
    markdown = write_results(output_dir, stem, results, meta, tensorboard=True, masks=masks)
    log.info("results in %s:\n%s", output_dir, markdown)
    return results


def apply_overrides(base: dict, overrides: Sequence[str]) -> dict:
    """``--model.mask.sparsity 0.3`` / ``--data.seq_len=64`` pairs set into the fit part of a config (values
    read as YAML), the same dotted keys ``dpruner fit`` takes; the rows' own settings still win."""
    config = copy.deepcopy(base)
    items = list(overrides)
    while items:
        key = items.pop(0)
        if not key.startswith("--") or key == "--":
            raise ValueError(f"unexpected argument {key!r}: overrides look like --model.mask.sparsity 0.3")
        key, sep, value = key[2:].partition("=")
        if not sep:
            if not items or items[0].startswith("--"):
                raise ValueError(f"--{key} needs a value")
            value = items.pop(0)
        path = key.split(".")
        if path[0] not in ("model", "data", "trainer", "seed_everything"):
            raise ValueError(f"unknown option --{key}: use --config, --output_dir, --dry_run or dotted keys under "
                             "model., data., trainer. (as dpruner fit takes them)")
        node = config
        for part in path[:-1]:
            child = node.get(part)
            node[part] = child = child if isinstance(child, dict) else {}
            node = child
        node[path[-1]] = yaml.safe_load(value)
    return config


def run_subcommand(name: str, argv: Sequence[str]) -> list[dict]:
    """``dpruner compare|sweep --config FILE [--output_dir DIR] [--dry_run] [--model.x.y VALUE ...]``;
    raises if a row failed. ``--dry_run`` validates every row (and task) and prints the plan."""
    parser = argparse.ArgumentParser(prog=f"dpruner {name}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a fit config with a top-level '%s:' section" % name)
    parser.add_argument("--output_dir", default=None, help="overrides the section's output_dir")
    parser.add_argument("--dry_run", action="store_true", help="validate the rows and print them; compute nothing")
    args, overrides = parser.parse_known_args(list(argv))
    base, extras = split_config(args.config)
    base = apply_overrides(base, overrides)
    if name not in EXTRA_SECTIONS or name not in extras:
        raise ValueError(f"{args.config} has no top-level '{name}:' section (expected one of {EXTRA_SECTIONS})")
    section = dict(extras[name] or {})
    rows = compare_rows(section) if name == "compare" else sweep_rows(section, base)
    tasks = parse_task_specs(section.get("tasks"), f"{name}.tasks")
    output_dir = Path(args.output_dir or section.get("output_dir") or f"runs/{name}_{Path(args.config).stem}")
    meta = {"title": section.get("title") or f"dpruner {name}: {Path(args.config).name}", "config": str(args.config)}
    runs, datamodule, seed = cli_rows(base, rows, output_dir, bool(section.get("save_artifacts", False)), tasks)
    if args.dry_run:
        plan = [{"method": r.label, "method_repr": repr(run.module.method) if r.method else DENSE,
                 "mask": vars(run.module.mask_spec), "config_key": run.key} for r, run in zip(rows, runs)]
        for row in plan:
            print(f"{row['method']}: {row['method_repr']}, mask {row['mask']}")
        return plan
    results = run_rows(rows, runs, datamodule, seed, output_dir, "comparison" if name == "compare" else "sweep", meta,
                       tasks=tasks)
    failed = [r["method"] for r in results if r.get("error")]
    if failed:
        raise RuntimeError(f"{len(failed)} row(s) failed: {failed}; see the log and {output_dir}")
    return results
