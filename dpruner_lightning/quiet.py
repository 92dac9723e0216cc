"""Warnings that are expected in a pruning run, silenced only where we run things: the CLI's ``main()``
installs the filters for its process; the Python API wraps its own Trainer calls in :func:`quiet`, so
a user's own filters and warnings are never changed."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator

#: Messages (regexes) of warnings every run would print: a frozen model left in eval mode, tiny
#: calibration loaders, no dataloader workers, a pytree deprecation inside Lightning, and the module's
#: callbacks replacing their own copies when one Trainer runs fit then validate.
KNOWN_WARNINGS = (".*in eval mode.*", ".*smaller than the logging interval.*", ".*does not have many workers.*",
                  ".*LeafSpec.*", ".*will override existing callbacks.*")


def install_known_filters() -> None:
    """Process-wide filters: for command-line entry points only."""
    for msg in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=msg)


@contextmanager
def quiet() -> Iterator[None]:
    """The same filters, for the duration of a block only."""
    with warnings.catch_warnings():
        install_known_filters()
        yield
