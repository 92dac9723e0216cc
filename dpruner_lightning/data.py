"""Calibration and evaluation data: text sources -> documents -> packed token blocks.

Documents come from a :class:`~dpruner_lightning.sources.TextSource` (local files, a hub dataset, a
built-in sample corpus or given texts; reading them, and the document split: :mod:`sources`).

:class:`CalibrationDataModule` holds two calibration sets, open-domain (``general``) and ``domain``,
each ``num_samples`` blocks of ``seq_len`` tokens (:func:`draw_blocks`): the documents are taken in a
seeded random order, tokenised, joined with EOS and packed, and tokenising stops as soon as the blocks
are full, so the data step costs what the blocks need, not what the corpus holds (about 60 PubMed
abstracts for 64 x 256 tokens, not 30,000). Evaluation sets are the first ``eval_samples`` blocks of
the held-out documents in their order, tokenised the same way, only as far as those blocks need. Unless
explicit evaluation sources are given, each source is first split BY DOCUMENT into calibration and
held-out documents; a held-out document is also removed from the OTHER calibration set (by a hash of
its text), so evaluation text never overlaps calibration text, and explicit evaluation sources that
share documents with the calibration text are refused (``allow_overlap`` turns that into a warning).

The datamodule is told, never asks: the caller hands it a tokenizer (``use_tokenizer``) and names the
set the next training loader reads (``serve``). ``setup`` only loads and checks the documents; tokenising
waits for the first need, since Lightning runs ``datamodule.setup`` before the callbacks' ``setup``.

Several processes (DDP), or a distributed strategy on one process: the calibration loader carries its own
``DistributedSampler`` with ``shuffle=False`` (Lightning would otherwise inject a SHUFFLED one for
training loaders, on one process too: the passes would then differ from a plain run's), so rank r
reads sequences r, r+N, r+2N, ... in order; when N does not divide the set, the sampler pads it with
repeated sequences (as every ``DistributedSampler`` does). Evaluation loaders get Lightning's own
(non-shuffled) ``DistributedSampler``, which pads the same way, so a perplexity on N processes may count
up to N-1 sequences twice.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from .corpora import document_hash, shared_documents

# Re-exported: tests and users import these text-source names from here (their home: sources.py).
from .sources import TextSource, load_documents, load_records, split_by_document  # noqa: F401

log = logging.getLogger(__name__)


def _pack(docs: Iterable[str], tokenizer, seq_len: int, max_blocks: Optional[int] = None,
          desc: Optional[str] = None) -> tuple[torch.Tensor, int]:
    """``(blocks, documents tokenised)``: see :func:`pack_tokens`."""
    eos = tokenizer.eos_token_id
    need = None if max_blocks is None else max_blocks * seq_len
    ids: list[int] = []
    used = 0
    # disable=None: a bar on a terminal only, nothing in logs or CI (tokenising is usually under a second now)
    with tqdm(total=need, desc=desc or "tokenising", unit="tok", disable=None, leave=False) as bar:
        for doc in docs:
            if need is not None and len(ids) >= need:
                break
            before = len(ids)
            ids.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])  # whole documents: no length notice
            if eos is not None:
                ids.append(eos)
            used += 1
            bar.update(len(ids) - before if need is None else min(len(ids), need) - min(before, need))
    n = len(ids) // seq_len if max_blocks is None else min(max_blocks, len(ids) // seq_len)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len), used


def pack_tokens(docs: Iterable[str], tokenizer, seq_len: int, max_blocks: Optional[int] = None,
                desc: Optional[str] = None) -> torch.Tensor:
    """Tokenise ``docs`` in order, join with EOS, and cut into ``[n_blocks, seq_len]`` (the incomplete
    tail is dropped). With ``max_blocks``, tokenising stops as soon as that many blocks are full: the
    result is then the first ``max_blocks`` blocks of packing every document (fewer if the text runs out).
    ``desc`` labels the progress bar (shown on a terminal only)."""
    return _pack(docs, tokenizer, seq_len, max_blocks, desc)[0]


def _check_enough(blocks: torch.Tensor, num_samples: int, what: str) -> None:
    if blocks.shape[0] < num_samples:
        raise ValueError(
            f"{what} is too short: it packs into {blocks.shape[0]} blocks of {blocks.shape[1] if blocks.ndim == 2 else '?'} "
            f"tokens but num_samples={num_samples} are needed. Add text, or lower num_samples or seq_len."
        )


def draw_blocks(docs: Sequence[str], tokenizer, seq_len: int, num_samples: int, seed: int, what: str) -> torch.Tensor:
    """``[num_samples, seq_len]`` calibration blocks: the documents in a seeded random order (a torch
    ``randperm`` seeded with ``seed``), tokenised and packed only until ``num_samples`` blocks are full.
    The same documents and seed always give the same blocks; the cost does not grow with the corpus.
    Raises ``ValueError`` (naming ``what``) when all the documents together are too short."""
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    blocks, used = _pack((docs[j] for j in order), tokenizer, seq_len, num_samples, desc=f"tokenising {what}")
    _check_enough(blocks, num_samples, what)
    log.info("%s: %d blocks of %d tokens from %d of its %d documents (seeded order)", what, num_samples, seq_len,
             used, len(docs))
    return blocks


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
        self._every_rank_reads_all = False  # see serve()
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

    def serve(self, source: str, every_rank_reads_all: bool = False) -> None:
        """Which calibration set (``general`` or ``domain``) the next :meth:`train_dataloader` returns;
        ``every_rank_reads_all``: on several processes, every rank gets every sequence (FSDP), not its share."""
        if source not in ("general", "domain"):
            raise ValueError(f"unknown calibration source {source!r}: serve() takes 'general' or 'domain'")
        self._serving, self._every_rank_reads_all = source, every_rank_reads_all

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
        """Draw the calibration blocks and pack the evaluation blocks now, tokenising only what they need
        (idempotent); needs a tokenizer (see :meth:`use_tokenizer`)."""
        if self._tokenised:
            return
        self.setup()
        tok = self._tokenizer()
        calibration, evaluation = {}, {}
        for i, name in enumerate(("general", "domain")):
            if name in self._documents:
                what = f"the {name} calibration text ({self.sources[name].describe()})"
                calibration[name] = draw_blocks(self._documents[name][0], tok, self.seq_len, self.num_samples, self.seed + i, what)
            if name in self._eval_documents:
                eval_blocks = pack_tokens(self._eval_documents[name], tok, self.seq_len, max_blocks=self.eval_samples,
                                          desc=f"tokenising the {name} evaluation text")
                if eval_blocks.shape[0] == 0:
                    raise ValueError(f"the {name} evaluation text is shorter than one sequence of {self.seq_len} tokens")
                evaluation[name] = eval_blocks
        self._calibration, self._evaluation, self._tokenised = calibration, evaluation, True
        for name in ("general", "domain"):
            log.info("%s: %d calibration / %d evaluation sequences of %d tokens", name,
                     len(calibration.get(name, ())), len(evaluation.get(name, ())), self.seq_len)

    def calibration_loader(self, name: str) -> DataLoader:
        if name not in self.calibration:
            raise ValueError(f"this pass reads the {name} calibration set, but the datamodule was given no {name} source")
        dataset = TokenBlocks(self.calibration[name])
        trainer = self.trainer
        # Under any distributed strategy, one process included, Lightning replaces a plain loader's sampler
        # with a SHUFFLING DistributedSampler: the passes would then see another order than a plain run
        # (a different dual pass). A DistributedSampler of our own, in order, is kept as given.
        if trainer is not None and isinstance(trainer.strategy, ParallelStrategy):  # several processes are one too
            if self._every_rank_reads_all:
                # FSDP: every rank reads every sequence (one replica; Lightning keeps a DistributedSampler as given)
                sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False)
            else:  # DDP: rank r reads sequences r, r+N, ... (no shuffling)
                sampler = DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """The calibration set named by the last :meth:`serve` (default ``general``)."""
        return self.calibration_loader(self._serving)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(TokenBlocks(self.evaluation[n]), batch_size=self.batch_size, num_workers=self.num_workers)
                for n in self.eval_names]
