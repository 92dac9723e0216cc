"""The brief's Python API for comparisons and sweeps, built on :mod:`comparison` (the same code as
``dpruner compare`` / ``dpruner sweep``)::

    suite = BenchmarkSuite("smollm2-135m", num_samples=32, seq_len=128)
    results = suite.compare_pruning_methods(open_domain_texts=..., domain_texts=..., test_texts=..., sparsity_ratio=0.5)
    print(suite.generate_comparison_report(results))

    runner = ExperimentRunner("./experiments")
    runner.run_sparsity_sweep("smollm2-135m", general, domain, test, sparsity_levels=[0.3, 0.5], domain="medical")

Texts are lists of strings; they are written to jsonl files under the output directory (so every row
reads the same files, and the run can be repeated with ``dpruner``). ``test_texts`` are the domain
evaluation set; the general evaluation set is held out (by document) of ``open_domain_texts``.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, Sequence

from .comparison import compare_rows, generate_comparison_report, run_rows, sweep_rows
from .config import MaskSpec, ModelSpec
from .data import CalibrationDataModule
from .export import atomic_write_text

_MODEL_KEYS = {f.name for f in fields(ModelSpec)} - {"name_or_path"}
_MASK_KEYS = {f.name for f in fields(MaskSpec)} - {"sparsity"}
_DATA_KEYS = set(inspect.signature(CalibrationDataModule.__init__).parameters) - {"self", "general", "domain", "eval_general", "eval_domain"}
_TRAINER_KEYS = {"accelerator", "devices", "precision"}


def _write_texts(path: Path, texts: Sequence[str], what: str) -> str:
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{what} must be a non-empty list of strings")
    atomic_write_text(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def api_config(model_name: str, data_dir: Path, open_domain_texts: Sequence[str], domain_texts: Sequence[str],
               test_texts: Sequence[str], sparsity: float, config: dict) -> dict:
    """A fit config from the API's arguments. ``config`` keys are sorted by name into ModelSpec, MaskSpec,
    datamodule or trainer options; for ``random:<type>`` models any other key is a model-config override."""
    model, mask, data, trainer, overrides = {}, {}, {}, {}, {}
    for key, value in config.items():
        if key == "seed":  # one seed for the random init (random:* models) and the data sampling
            model[key] = data[key] = value
            continue
        for keys, dest in ((_MODEL_KEYS, model), (_MASK_KEYS, mask), (_DATA_KEYS, data), (_TRAINER_KEYS, trainer)):
            if key in keys:
                dest[key] = value
                break
        else:
            if not model_name.startswith("random:"):
                raise TypeError(f"unknown option {key!r}; options: {sorted(_MODEL_KEYS | _MASK_KEYS | _DATA_KEYS | _TRAINER_KEYS)}")
            overrides[key] = value
    if overrides:
        model["config_overrides"] = {**model.get("config_overrides", {}), **overrides}
    sources = {"general": open_domain_texts, "domain": domain_texts, "eval_domain": test_texts}
    for key, texts in sources.items():
        data[key] = {"path": _write_texts(data_dir / f"{key}.jsonl", texts, f"{key} texts")}
    return {"seed_everything": 0, "trainer": {"enable_progress_bar": False, **trainer},
            "model": {"model": {"name_or_path": model_name, **model}, "mask": {"sparsity": sparsity, **mask}}, "data": data}


class BenchmarkSuite:
    """``BenchmarkSuite(model_name, **options).compare_pruning_methods(...)``: ``dpruner compare`` from Python.

    ``model_name``: a hub id, a local folder, an alias (``smollm2-135m``) or ``random:<type>``;
    ``options``: ModelSpec / MaskSpec / datamodule / trainer options (``tokenizer="bytes"``,
    ``num_samples=8``, ``seq_len=64`` ...) and ``output_dir`` (default ``runs/benchmark``).
    ``test_texts`` are the domain evaluation set; the general one is held out of ``open_domain_texts``.
    """

    def __init__(self, model_name: str, output_dir: str | Path = "runs/benchmark", **config: Any) -> None:
        self.model_name, self.output_dir, self.config = model_name, Path(output_dir), config

    def compare_pruning_methods(self, open_domain_texts: Sequence[str], domain_texts: Sequence[str], test_texts: Sequence[str],
                                sparsity_ratio: float = 0.5, methods: Optional[Sequence[Any]] = None) -> list[dict]:
        """One result dict per row (dense + ``methods``, default every registered method)."""
        rows = compare_rows({} if methods is None else {"methods": list(methods)})
        base = api_config(self.model_name, self.output_dir / "data", open_domain_texts, domain_texts, test_texts,
                          sparsity_ratio, self.config)
        meta = {"title": f"{self.model_name} at sparsity {sparsity_ratio}"}
        return run_rows(base, rows, self.output_dir, "comparison", meta)

    @staticmethod
    def generate_comparison_report(results: list[dict]) -> str:
        return generate_comparison_report(results)


class ExperimentRunner:
    """Sparsity and D-PRUNER hyperparameter sweeps from Python, written under ``output_dir/<domain>_*``."""

    def __init__(self, output_dir: str | Path = "./experiments") -> None:
        self.output_dir = Path(output_dir)

    def _sweep(self, model_name: str, texts: tuple, section: dict, out: Path, config: dict) -> list[dict]:
        rows = sweep_rows(section, {})
        base = api_config(model_name, out / "data", *texts, section["sparsities"][0], config)
        return run_rows(base, rows, out, "sweep", {"title": f"{model_name}: {out.name}"})

    def run_sparsity_sweep(self, model_name: str, open_domain_texts: Sequence[str], domain_texts: Sequence[str],
                           test_texts: Sequence[str], sparsity_levels: Sequence[float], domain: str = "domain",
                           method: Any = "d_pruner", **config: Any) -> list[dict]:
        """Dense + ``method`` at every sparsity level."""
        section = {"sparsities": list(sparsity_levels), "methods": [method]}
        texts = (open_domain_texts, domain_texts, test_texts)
        return self._sweep(model_name, texts, section, self.output_dir / f"{domain}_sparsity", config)

    def run_hyperparameter_sweep(self, model_name: str, open_domain_texts: Sequence[str], domain_texts: Sequence[str],
                                 test_texts: Sequence[str], lambda_values: Sequence[float], alpha_values: Sequence[float],
                                 domain: str = "domain", sparsity: float = 0.5, method: Any = "d_pruner",
                                 **config: Any) -> list[dict]:
        """Dense + D-PRUNER at every (lambda_reg, alpha) pair, at one sparsity."""
        section = {"sparsities": [sparsity], "methods": [method], "lambda_values": list(lambda_values),
                   "alpha_values": list(alpha_values)}
        texts = (open_domain_texts, domain_texts, test_texts)
        return self._sweep(model_name, texts, section, self.output_dir / f"{domain}_hyperparameters", config)
