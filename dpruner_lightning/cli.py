"""The ``dpruner`` command.

* ``dpruner fit --config configs/<name>.yaml``: the calibration passes, the masks, then a validation of
  the pruned model; everything lands in the run's log directory (``runs/<name>/version_N``).
* ``dpruner validate --config ...``: perplexity of the (dense) model on the evaluation sets.
* ``dpruner compare --config configs/compare_*.yaml``: dense + several methods on the same data.
* ``dpruner sweep --config ...``: one method over several sparsities.
* ``dpruner speed --model <folder> [--compare <dense folder>]``: latency, tokens/s and memory of a
  (pruned) model with each sparse backend available here (see :mod:`speed`).
* ``dpruner eval --model <folder> --tasks <names...>``: task scores of a dense or pruned model, our tasks
  and lm-eval-harness's (``lm_eval:<task>``, extra ``[eval]``; see :mod:`eval_cli`).

``fit`` and ``validate`` are LightningCLI subcommands (``--print_config`` works); ``compare`` and
``sweep`` read the same YAML plus a section of their own.

Errors: one line on stderr, exit code 2 for bad input (a wrong setting, a missing or malformed file,
a folder that would be overwritten) and 1 for a failure during the run; ``--verbose`` (or
``DPRUNER_VERBOSE=1``) shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Optional

from .quiet import install_known_filters

log = logging.getLogger(__name__)

#: Exceptions that mean "the input is wrong" (exit 2) rather than "the run failed" (exit 1).
#: (Decoding and JSON errors are ValueErrors.)
BAD_INPUT = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, KeyError)


USAGE = """usage: dpruner <command> [options]   (dpruner <command> --help for its options)

commands:
  fit       calibration passes, masks, validation; artifacts in the run folder (--config configs/<name>.yaml)
  validate  perplexity of the model on the evaluation sets
  compare   dense + several methods on the same data (a config with a 'compare:' section)
  sweep     one or more methods over several sparsities (a config with a 'sweep:' section)
  speed     latency, tokens/s and memory of a (pruned) model with each sparse backend available here
  eval      task scores of a (pruned) model: our tasks and lm-eval-harness's (lm_eval:<task>, extra [eval])

options for every command: --verbose (show the traceback of an error)"""
COMMANDS = ("fit", "validate", "compare", "sweep", "speed", "eval")


def run(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        if not argv:
            raise SystemExit(2)
        return
    if argv[0] not in COMMANDS:
        raise ValueError(f"unknown command {argv[0]!r}: use one of {', '.join(COMMANDS)} (dpruner --help)")
    if argv and argv[0] in ("compare", "sweep"):
        from .comparison import run_subcommand

        run_subcommand(argv[0], argv[1:])
        return
    if argv and argv[0] == "speed":
        from .speed_report import run_speed

        run_speed(argv[1:])
        return
    if argv and argv[0] == "eval":
        from .eval_cli import run_eval

        run_eval(argv[1:])
        return
    from .lightning_cli import DPrunerCLI

    with warnings.catch_warnings():  # argv is given on purpose: main() removed --verbose from it
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        DPrunerCLI(args=argv)


def main(args: Optional[list[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    install_known_filters()
    argv = list(sys.argv[1:] if args is None else args)
    verbose = "--verbose" in argv or os.environ.get("DPRUNER_VERBOSE", "") not in ("", "0")
    argv = [a for a in argv if a != "--verbose"]
    try:
        run(argv)
    except KeyboardInterrupt:
        print("dpruner: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # one clear line; the traceback only on request
        if verbose:
            raise
        code, kind = (2, "error") if isinstance(err, BAD_INPUT) else (1, "failed")
        message = str(err).strip() or type(err).__name__
        print(f"dpruner: {kind}: {message}\n(run again with --verbose for the traceback)", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
