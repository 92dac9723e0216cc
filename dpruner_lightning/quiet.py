"""Warnings and notices that are expected in a pruning run, silenced only where we run things: the
CLI's ``main()`` installs the filters for its process; the Python API wraps its own Trainer calls in
:func:`quiet`, so a user's own filters and warnings are never changed outside those calls."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from typing import Iterator

#: Messages (regexes) of warnings every run would print: a frozen model left in eval mode, tiny
#: calibration loaders, no dataloader workers, a pytree deprecation inside Lightning, and the module's
#: callbacks replacing their own copies when one Trainer runs fit then validate.
KNOWN_WARNINGS = (".*in eval mode.*", ".*smaller than the logging interval.*", ".*does not have many workers.*",
                  ".*LeafSpec.*", ".*will override existing callbacks.*")
#: Lightning's log records that say nothing about the run (once per Trainer; the module's callbacks
#: replace their own copies when one Trainer runs fit then validate).
KNOWN_NOTICES = ("litlogger", "will override existing callbacks")
#: Loggers whose handlers print Lightning's notices (they do not propagate to the root logger).
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(n in message for n in KNOWN_NOTICES)


_DROP = _DropNotices()


def _handlers() -> list[logging.Handler]:
    return [h for name in _LIGHTNING_LOGGERS for h in logging.getLogger(name).handlers] + logging.getLogger().handlers


def _ignore_known_warnings() -> None:
    for msg in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=msg)


def install_known_filters() -> None:
    """Process-wide filters: for command-line entry points only."""
    _ignore_known_warnings()
    for handler in _handlers():
        handler.addFilter(_DROP)


@contextmanager
def quiet() -> Iterator[None]:
    """The same filters, for the duration of a block only."""
    handlers = [h for h in _handlers() if _DROP not in h.filters]
    with warnings.catch_warnings():
        _ignore_known_warnings()
        for handler in handlers:
            handler.addFilter(_DROP)
        try:
            yield
        finally:
            for handler in handlers:
                handler.removeFilter(_DROP)
