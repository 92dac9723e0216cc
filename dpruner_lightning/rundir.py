"""Run folders: one writer at a time, never two runs mixed, a status that says whether the run finished.

* A lock file (``.dpruner.lock``, holding the writer's pid) is taken when a run starts writing into its
  folder; a second run into the same folder fails at once, naming the first. A lock whose process is
  gone is stale and taken over.
* A folder that already holds a run (a ``summary.json``) is refused, unless ``overwrite`` is set: then
  only the files a run writes are removed (:data:`RUN_FILES`, TensorBoard event files, and export
  folders with our manifest); anything else in it stays.
* ``summary.json`` carries ``status``: ``running`` while a stage is in progress, ``complete`` when it
  ended, ``interrupted`` (Ctrl-C / SIGTERM) or ``failed`` (with the error). A run killed outright
  (SIGKILL, power loss) is left ``running``: never mistaken for a finished one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .export import MANIFEST, check_replaceable, pid_alive

log = logging.getLogger(__name__)

LOCK = ".dpruner.lock"
#: Files a run writes directly in its folder (export folders are recognised by their manifest).
RUN_FILES = ("summary.json", "config.yaml", "hparams.yaml", "masks.safetensors", "importance.safetensors",
             "general_importance.safetensors", "dual_importance.safetensors")
EXPORT_FOLDERS = ("pruned_model", "sparse_model", "compressed_24_model")
#: Folders this process has claimed: later stages of the same run (fit, then validate) write there again.
_CLAIMED: set[str] = set()


def lock_holder(folder: str | Path) -> int | None:
    """The pid holding ``folder``'s lock, or None (no lock, or a stale one)."""
    try:
        pid = int((Path(folder) / LOCK).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and pid_alive(pid) else None


def acquire_lock(folder: str | Path) -> None:
    """Take ``folder``'s lock for this process (re-entrant); raise if another live process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(folder)
            if holder == os.getpid():
                return
            if holder is not None:
                raise RuntimeError(f"another dpruner run (pid {holder}) is writing to {folder}: wait for it to finish, "
                                   "or give this run another folder (e.g. another trainer.logger version)") from None
            log.warning("taking over the stale lock %s (its process is gone)", path)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return
    raise RuntimeError(f"could not lock {folder}: {path} keeps reappearing (another run starting at the same time?)")


def release_lock(folder: str | Path) -> None:
    if lock_holder(folder) == os.getpid():
        (Path(folder) / LOCK).unlink(missing_ok=True)


def previous_status(folder: str | Path) -> str | None:
    """``status`` of the run already in ``folder`` (``unknown`` for a summary without one), or None."""
    try:
        summary = json.loads((Path(folder) / "summary.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "unreadable"
    return str(summary.get("status", "unknown"))


def _ours(path: Path) -> bool:
    if path.name in RUN_FILES or path.name.startswith("events.out.tfevents."):
        return path.is_file()
    if path.name in EXPORT_FOLDERS and path.is_dir():
        try:
            check_replaceable(path)  # only a folder holding nothing but what we wrote
        except FileExistsError:
            return False
        return (path / MANIFEST).exists() or not any(path.iterdir())
    return False


def clear_run(folder: str | Path) -> list[str]:
    """Remove what an earlier run wrote in ``folder`` (nothing else); returns the names removed."""
    removed = []
    for path in sorted(Path(folder).iterdir()):
        if _ours(path):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path.name)
    return removed


def claim_run_dir(folder: str | Path, overwrite: bool = False) -> None:
    """Lock ``folder`` for this run; refuse (or with ``overwrite``, clear) an earlier run in it."""
    folder = Path(folder)
    acquire_lock(folder)
    key = str(folder.resolve())
    if key in _CLAIMED:  # a later stage of a run this process started (fit, then validate)
        return
    _CLAIMED.add(key)
    status = previous_status(folder)
    if status is None:
        return
    if not overwrite:
        _CLAIMED.discard(key)
        release_lock(folder)
        raise FileExistsError(f"{folder} already holds a run (status {status!r}): refusing to mix two runs. Use another "
                              "folder (the default logger numbers them), or set model.output.overwrite: true to "
                              "replace what that run wrote (other files are kept)")
    log.warning("overwrite: removing the earlier run's files from %s: %s", folder, clear_run(folder))
