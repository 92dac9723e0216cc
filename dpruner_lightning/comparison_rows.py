"""The rows of a ``compare`` / ``sweep`` table, planned from the config sections before anything runs.

:func:`compare_rows` and :func:`sweep_rows` turn a section into :class:`Row` objects (label, method,
``model.mask`` overrides, extra columns), checking its keys, its method entries (:func:`method_entry`:
a registered name, ``dense``, or ``{name, class_path?, init_args?, mask?}``) and that the labels are
unique; :func:`row_folder` and :func:`row_method` give a row's log directory name and method object.
:func:`row_key` keys a row's resolved config (restarts keep :func:`finished_rows` with the same key),
:func:`pass_group_config` / :func:`execution_order` say which rows share their calibration passes.
Instantiating and running the rows: :mod:`comparison`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from .algorithms.masks import parse_granularity
from .evaluation import upgrade_metrics
from .methods import METHODS, DPrunerMethod, method_class

DENSE = "dense"
_COMPARE_KEYS = {"methods", "output_dir", "save_artifacts", "title", "tasks"}
_SWEEP_KEYS = _COMPARE_KEYS | {"sparsities", "lambda_values", "alpha_values", "include_dense"}


@dataclass
class Row:
    """One line of the table: a label, the ``model.method`` value (None: the dense model), overrides of
    ``model.mask``, and extra columns (a sweep's sparsity / lambda / alpha)."""

    label: str
    method: Optional[dict]
    mask: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


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


def pass_group_config(config: dict) -> dict:
    """A row's resolved fit config without what only the masks read (``model.mask.sparsity``) and without
    its log directory: rows with equal ones share their calibration passes (one fit, see :mod:`reprune`)."""
    config = copy.deepcopy(config)
    mask = _model_section(config).get("mask")
    if isinstance(mask, dict):
        mask.pop("sparsity", None)
    (config.get("trainer") or {}).pop("logger", None)
    return config


def execution_order(groups: list[Optional[str]], todo: list[int]) -> list[list[int]]:
    """The row indices ``todo`` (in table order) as runs of rows sharing their passes: a row whose group is
    None runs alone; every other row joins the first earlier row of its group. Runs are ordered by
    their first row, so one fitted model at a time is kept for re-pruning."""
    runs: list[list[int]] = []
    by_group: dict[str, list[int]] = {}
    for i in todo:
        key = groups[i]
        if key is not None and key in by_group:
            by_group[key].append(i)
            continue
        runs.append([i])
        if key is not None:
            by_group[key] = runs[-1]
    return runs


def row_folder(row: Row) -> str:
    """The row's log directory name under the output directory."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", row.label)


def row_method(row: Row):
    """The row's method object (the dense row: magnitude, never run, keeps the module free of constraints)."""
    entry = row.method or {"class_path": "dpruner_lightning.methods.MagnitudeMethod", "init_args": {}}
    cls = _resolve(entry["class_path"])
    try:
        return cls(**entry.get("init_args", {}))
    except TypeError as err:
        raise ValueError(f"row {row.label!r}: {err}") from err


def in_table_order(results: list[dict], rows: Sequence[Row]) -> list[dict]:
    """``results`` in the order of the planned ``rows`` (rows of an earlier run that are not planned last)."""
    index = {r.label: i for i, r in enumerate(rows)}
    return sorted(results, key=lambda r: index.get(r.get("method"), len(index)))


def row_key(config: dict, tasks: Sequence[Any] = ()) -> str:
    """A hash of a row's resolved config and the tasks it is scored on (restarts match rows by it)."""
    text = json.dumps({"config": config, "tasks": [repr(t) for t in tasks]}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_rows(path: Path, rows: Sequence[Row], keys: Sequence[str]) -> tuple[list[dict], set[str]]:
    """``(rows already in the results file at path, labels of those finished with the same config)``.
    A row of the same name run with another config is an error: its results would be replaced."""
    try:
        previous = json.loads(path.read_text()).get("rows", [])
    except FileNotFoundError:
        return [], set()
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} exists but cannot be read ({err}): move it away to start afresh") from err
    # rows saved before accuracy_norm was renamed accuracy_per_token: the same numbers under the new names
    previous = [{**r, "tasks": {n: upgrade_metrics(m, str(path)) for n, m in r["tasks"].items()}}
                if isinstance(r.get("tasks"), dict) else r for r in previous]
    planned = {r.label: k for r, k in zip(rows, keys)}
    done = set()
    for old in previous:
        label, key = old.get("method"), old.get("config_key")
        if label in planned and key != planned[label]:
            raise FileExistsError(f"{path} holds a row {label!r} run with another config: give this run another "
                                  "output_dir (or move the old results away) rather than mixing them")
        if label in planned and not old.get("error"):
            done.add(label)
    return list(previous), done
