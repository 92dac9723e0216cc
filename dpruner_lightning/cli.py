"""The ``dpruner`` command.

* ``dpruner fit --config configs/<name>.yaml``: the calibration passes, the masks, then a validation of
  the pruned model; everything lands in the run's log directory (``runs/<name>/version_N``).
* ``dpruner validate --config ...``: perplexity of the (dense) model on the evaluation sets.
* ``dpruner compare --config configs/compare_*.yaml``: dense + several methods on the same data.
* ``dpruner sweep --config ...``: one method over several sparsities.

``fit`` and ``validate`` are LightningCLI subcommands (``--print_config`` works); ``compare`` and
``sweep`` read the same YAML plus a section of their own.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Optional

from lightning.pytorch.cli import LightningCLI

from .data import CalibrationDataModule
from .module import DPrunerModule

log = logging.getLogger("dpruner_lightning")

TRAINER_DEFAULTS = {
    "enable_checkpointing": False,  # artifacts are saved explicitly (see callbacks.MaskApplication)
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 1,
    "max_epochs": -1,  # set from the method's passes when fit starts
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "dpruner"},
    },
}


def quiet_known_warnings() -> None:
    """Warnings that are expected in a pruning run (frozen eval-mode model, tiny loaders)."""
    for msg in (".*in eval mode.*", ".*smaller than the logging interval.*", ".*does not have many workers.*",
                ".*will override existing callbacks.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=msg)


class DPrunerCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, **kwargs) -> None:
        quiet_known_warnings()
        super().__init__(
            DPrunerModule,
            CalibrationDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )

    def after_fit(self) -> None:
        """Validate the pruned model, so ``summary.json`` holds dense and pruned perplexity."""
        self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        log.info("%s", format_perplexities(self.model.perplexities))
        log.info("run directory: %s", self.trainer.log_dir)


def format_perplexities(perplexities: dict[str, dict[str, float]]) -> str:
    names = sorted({n for v in perplexities.values() for n in v})
    lines = ["perplexity " + " ".join(f"{n:>12}" for n in names)]
    for stage, values in perplexities.items():
        lines.append(f"{stage:<10} " + " ".join(f"{values.get(n, float('nan')):12.3f}" for n in names))
    return "\n".join(lines)


def main(args: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ("compare", "sweep"):
        from .comparison import run_subcommand

        run_subcommand(argv[0], argv[1:])
        return
    DPrunerCLI(args=argv)


if __name__ == "__main__":
    main()
