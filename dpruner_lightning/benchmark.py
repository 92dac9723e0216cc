"""The Python API for comparisons and sweeps (named as in the original D-PRUNER README), built on
:mod:`comparison` (the same row runner as ``dpruner compare`` / ``dpruner sweep``)::

    suite = BenchmarkSuite("smollm2-135m", num_samples=32, seq_len=128)
    results = suite.compare_pruning_methods(open_domain_texts=..., domain_texts=..., test_texts=..., sparsity_ratio=0.5)
    print(suite.generate_comparison_report(results))

    runner = ExperimentRunner("./experiments")
    runner.run_sparsity_sweep("smollm2-135m", general, domain, test, sparsity_levels=[0.3, 0.5], domain="medical")

Texts are lists of strings. ``test_texts`` are the domain evaluation set; the general evaluation set is
held out (by document) of ``open_domain_texts``. The rows are built as objects (specs, method, module,
trainer), exactly as the YAML route instantiates them; nothing is written but the results. As there,
the rows of a sweep that differ only in sparsity compute their importance once (one fit) and prune
each level from it; progress: a log line per row and, on a terminal, Lightning's bar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from .comparison import NO_EPOCH_VALIDATION, RowRun, generate_comparison_report, progress_bars, run_rows
from .comparison_rows import Row, compare_rows, row_folder, row_key, row_method, sweep_rows
from .config import MaskSpec, ModelSpec, OutputSpec
from .data import CalibrationDataModule
from .module import DPrunerModule
from .sources import TextSource

_MODEL_KEYS = {f.name for f in fields(ModelSpec)} - {"name_or_path"}
_MASK_KEYS = {f.name for f in fields(MaskSpec)} - {"sparsity"}
_SOURCES = {"general", "domain", "eval_general", "eval_domain"}
_DATA_KEYS = set(inspect.signature(CalibrationDataModule.__init__).parameters) - {"self"} - _SOURCES
_TRAINER_KEYS = {"accelerator", "devices", "precision"}


@dataclasses.dataclass
class SuiteOptions:
    """``BenchmarkSuite(model_name, **options)`` sorted into the objects a row is built from."""

    model: ModelSpec
    mask: MaskSpec
    data: dict
    trainer: dict
    seed: int = 0

    @classmethod
    def parse(cls, model_name: str, sparsity: float, options: dict) -> "SuiteOptions":
        """ModelSpec / MaskSpec / datamodule / trainer options by name; ``seed`` seeds the random init
        (``random:*`` models) and the data sampling; for ``random:*`` models any other key is a
        model-config override."""
        model, mask, data, trainer, overrides = {}, {}, {}, {}, {}
        seed = int(options.get("seed", 0))
        for key, value in options.items():
            if key == "seed":
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
        return cls(model=ModelSpec(name_or_path=model_name, seed=seed, **model),
                   mask=MaskSpec(sparsity=sparsity, **mask), data={"seed": seed, **data}, trainer=trainer, seed=seed)


def _digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass") + b"\\0")
    return h.hexdigest()[:16]


def build_rows(options: SuiteOptions, rows: Sequence[Row], texts: tuple, output_dir: Path
               ) -> tuple[list[RowRun], CalibrationDataModule]:
    """Every row as objects, plus the datamodule they share (the texts are handed over in memory)."""
    general, domain, test = texts
    datamodule = CalibrationDataModule(general=TextSource(texts=general), domain=TextSource(texts=domain),
                                       eval_domain=TextSource(texts=test), **options.data)
    shared = {"model": dataclasses.asdict(options.model), "data": options.data, "trainer": options.trainer,
              "texts": [_digest(t) for t in texts]}
    runs = []
    for row in rows:
        method = row_method(row)
        mask = dataclasses.replace(options.mask, **row.mask)
        output = OutputSpec(save_importance=False, save_masks=False, export_model=False, overwrite=True)
        module = DPrunerModule(model=options.model, method=method, mask=mask, output=output)
        trainer = L.Trainer(**options.trainer, enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1,
                            enable_progress_bar=progress_bars(), enable_model_summary=False,
                            check_val_every_n_epoch=NO_EPOCH_VALIDATION,
                            logger=TensorBoardLogger(str(output_dir), name=row_folder(row), version=""))
        config = {**shared, "row": row.label, "method": repr(method) if row.method else "dense",
                  "mask": dataclasses.asdict(mask)}
        # Rows equal but for the sparsity share their calibration passes (see comparison.run_rows).
        # (the repr leaves some arguments out, e.g. D-PRUNER's max_grad_norm: the init arguments decide)
        passes = {**config, "row": None, "method": [row.method, config["method"]],
                  "mask": {k: v for k, v in config["mask"].items() if k != "sparsity"}}
        runs.append(RowRun(module, trainer, row_key(config), row_key(passes) if row.method else None))
    return runs, datamodule


def _run(model_name: str, texts: tuple, sparsity: float, options: dict, rows: Sequence[Row], output_dir: Path,
         stem: str, title: str) -> list[dict]:
    parsed = SuiteOptions.parse(model_name, sparsity, options)
    runs, datamodule = build_rows(parsed, rows, texts, output_dir)
    return run_rows(rows, runs, datamodule, parsed.seed, output_dir, stem, {"title": title})


class BenchmarkSuite:
    """``BenchmarkSuite(model_name, **options).compare_pruning_methods(...)``: ``dpruner compare`` from Python.

    ``model_name``: a hub id, a local folder, an alias (``smollm2-135m``) or ``random:<type>``;
    ``options``: ModelSpec / MaskSpec / datamodule / trainer options (``tokenizer="bytes"``,
    ``num_samples=8``, ``seq_len=64`` ...) and ``output_dir`` (default ``runs/benchmark``).
    ``test_texts`` are the domain evaluation set; the general one is held out of ``open_domain_texts``.
    """

    def __init__(self, model_name: str, output_dir: str | Path = "runs/benchmark", **config: Any) -> None:
        self.model_name, self.output_dir, self.config = model_name, Path(output_dir), config
        SuiteOptions.parse(model_name, 0.5, config)  # unknown options fail now, not after the first row

    def compare_pruning_methods(self, open_domain_texts: Sequence[str], domain_texts: Sequence[str], test_texts: Sequence[str],
                                sparsity_ratio: float = 0.5, methods: Optional[Sequence[Any]] = None) -> list[dict]:
        """One result dict per row (dense + ``methods``, default every registered method)."""
        rows = compare_rows({} if methods is None else {"methods": list(methods)})
        texts = (open_domain_texts, domain_texts, test_texts)
        return _run(self.model_name, texts, sparsity_ratio, self.config, rows, self.output_dir, "comparison",
                    f"{self.model_name} at sparsity {sparsity_ratio}")

    @staticmethod
    def generate_comparison_report(results: list[dict]) -> str:
        return generate_comparison_report(results)


class ExperimentRunner:
    """Sparsity and D-PRUNER hyperparameter sweeps from Python, written under ``output_dir/<domain>_*``."""

    def __init__(self, output_dir: str | Path = "./experiments") -> None:
        self.output_dir = Path(output_dir)

    def _sweep(self, model_name: str, texts: tuple, section: dict, out: Path, config: dict) -> list[dict]:
        rows = sweep_rows(section, {})
        return _run(model_name, texts, section["sparsities"][0], config, rows, out, "sweep", f"{model_name}: {out.name}")

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
