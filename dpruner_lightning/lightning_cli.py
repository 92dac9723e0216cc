"""The LightningCLI of ``dpruner fit`` / ``dpruner validate``, also used by ``compare`` and ``sweep`` to
validate and instantiate their configs (so every command reads the same YAML the same way)."""

from __future__ import annotations

import logging

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from .callbacks import run_dir
from .data import CalibrationDataModule
from .module import DPrunerModule
from .rundir import claim_run_dir

log = logging.getLogger(__name__)

TRAINER_DEFAULTS = {
    "enable_checkpointing": False,  # artifacts are saved explicitly (see callbacks.MaskApplication)
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "max_epochs": -1,  # set from the method's passes before fit (DPrunerModule.configure_trainer)
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "dpruner"},
    },
}


def format_perplexities(perplexities: dict[str, dict[str, float]]) -> str:
    names = sorted({n for v in perplexities.values() for n in v})
    lines = ["perplexity " + " ".join(f"{n:>12}" for n in names)]
    for stage, values in perplexities.items():
        lines.append(f"{stage:<10} " + " ".join(f"{values.get(n, float('nan')):12.3f}" for n in names))
    return "\n".join(lines)


class SaveRunConfig(SaveConfigCallback):
    """``config.yaml`` into the run folder (:func:`~dpruner_lightning.callbacks.run_dir`: never loose in
    the current directory when there is no logger). The folder was claimed before fit / validate."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        out = run_dir(trainer)  # a collective: on every rank
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(out / self.config_filename), skip_none=False, overwrite=True,
                             multifile=self.multifile)
        self.already_saved = True


class DPrunerCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        super().__init__(
            DPrunerModule,
            CalibrationDataModule,
            save_config_callback=SaveRunConfig,
            trainer_defaults=TRAINER_DEFAULTS,
            auto_configure_optimizers=False,  # the passes' steps are the method's: no optimizer options
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict:
        """``fit`` and ``validate`` only: a pruning module has no test or predict step."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def _claim(self) -> None:
        # Before the SaveConfigCallback writes config.yaml: an earlier run's folder is refused untouched.
        claim_run_dir(run_dir(self.trainer), self.model.output.overwrite)

    def before_fit(self) -> None:
        self.model.configure_trainer(self.trainer)
        self._claim()

    def before_validate(self) -> None:
        self._claim()

    def after_fit(self) -> None:
        """Validate the pruned model, so ``summary.json`` holds dense and pruned perplexity."""
        self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        log.info("%s", format_perplexities(self.model.perplexities))
        log.info("run directory: %s", run_dir(self.trainer))
