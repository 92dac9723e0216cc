"""Repository hygiene, checked by the test command CI runs: lint and no large files outside data folders."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .conftest import REPO

#: Folders where larger files are expected (recorded results, fixtures).
DATA_FOLDERS = ("benchmarks/results/", "configs/smoke/", "tests/data/")
MAX_BYTES = 250_000


def test_ruff_is_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    proc = subprocess.run([ruff, "check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_no_large_file_is_tracked_outside_data_folders():
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    large = [f"{f} ({(REPO / f).stat().st_size} bytes)" for f in files
             if (REPO / f).is_file() and (REPO / f).stat().st_size > MAX_BYTES and not f.startswith(DATA_FOLDERS)]
    assert not large, f"files over {MAX_BYTES} bytes outside {DATA_FOLDERS}: {large}"
