"""Checks that a model folder's weight files are complete: missing shards of a weight index, truncated
safetensors files (read from their headers only) and torch zip checkpoints whose zip directory is gone.

Used on cached demo models (:mod:`assets`) and on any local model folder (:mod:`models`).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path


def weight_files_problem(folder: Path) -> str | None:
    """What is wrong with the weight files of a model folder (truncated, missing shard), or None. Reads
    only the headers: a complete safetensors file is exactly as long as its header says."""
    for index in sorted(folder.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{index} is not a valid weight index (no weight_map)"
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            return f"{index} lists weight files that are missing: {', '.join(missing)}"
    for file in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(file)
        if problem:
            return problem
    for file in sorted([*folder.glob("*.bin"), *folder.glob("*.pt")]):
        with open(file, "rb") as f:
            is_zip = f.read(2) == b"PK"  # torch.save's format; an old plain pickle is not checked
        if is_zip and not _zip_complete(file):
            return f"{file} is truncated or corrupt (its zip directory cannot be read)"
    return None


def _zip_complete(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            return f"{path} is truncated: {size} bytes, too short for its safetensors header"
        try:
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"{path} is corrupt: its safetensors header cannot be read"
    if 8 + n + end != size:
        return f"{path} is truncated or corrupt: its header describes {8 + n + end} bytes but the file has {size}"
    return None
