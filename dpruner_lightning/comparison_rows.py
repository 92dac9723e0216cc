"""The rows of a ``compare`` / ``sweep`` table, planned from the config sections before anything runs.

:func:`compare_rows` and :func:`sweep_rows` turn a section into :class:`Row` objects (label, method,
``model.mask`` overrides, extra columns), checking its keys, its method entries (:func:`method_entry`:
a registered name, ``dense``, or ``{name, class_path?, init_args?, mask?}``) and that the labels are
unique; :func:`row_folder` and :func:`row_method` give a row's log directory name and method object.
Instantiating and running the rows: :mod:`comparison`.
"""

from __future__ import annotations

import copy
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .algorithms.masks import parse_granularity
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
