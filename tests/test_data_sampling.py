"""The data step tokenises only what the blocks need, deterministically; hub sources fall back fast offline."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from dpruner_lightning import sources
from dpruner_lightning.data import CalibrationDataModule, TextSource, draw_blocks, load_documents, pack_tokens
from dpruner_lightning.models import byte_tokenizer


class CountingTokenizer:
    """The byte tokenizer, counting the documents it is asked to tokenise."""

    def __init__(self) -> None:
        self.inner, self.calls = byte_tokenizer(), 0

    def __call__(self, text, **kwargs):
        self.calls += 1
        return self.inner(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _corpus(n: int, kind: str) -> list[str]:
    return [f"{kind} document {i}: a short text about topic {i % 17}." for i in range(n)]  # ~45 bytes each


def _datamodule(n: int, seed: int = 0) -> tuple[CalibrationDataModule, CountingTokenizer]:
    dm = CalibrationDataModule(general=TextSource(texts=_corpus(n, "general")), domain=TextSource(texts=_corpus(n, "domain")),
                               seq_len=32, num_samples=4, eval_samples=2, eval_fraction=0.1, seed=seed)
    tok = CountingTokenizer()
    dm.use_tokenizer(tok)
    dm.prepare_blocks()
    return dm, tok


def test_a_large_source_tokenises_only_what_the_blocks_need():
    small, tok_small = _datamodule(200)
    large, tok_large = _datamodule(20_000)
    # 4 x 32 calibration tokens (~3 documents) and 2 x 32 evaluation tokens (~2) per set: a few
    # documents, whatever the corpus size (packing every document would be 20,000 calls).
    assert tok_large.calls <= 16 and tok_small.calls <= 16
    for dm in (small, large):
        assert {k: tuple(v.shape) for k, v in dm.calibration.items()} == {"general": (4, 32), "domain": (4, 32)}
        assert {k: tuple(v.shape) for k, v in dm.evaluation.items()} == {"general": (2, 32), "domain": (2, 32)}


def test_same_seed_same_blocks_other_seed_other_blocks():
    a, _ = _datamodule(2000, seed=0)
    b, _ = _datamodule(2000, seed=0)
    c, _ = _datamodule(2000, seed=1)
    for name in ("general", "domain"):
        assert torch.equal(a.calibration[name], b.calibration[name]) and torch.equal(a.evaluation[name], b.evaluation[name])
        assert not torch.equal(a.calibration[name], c.calibration[name])


def test_blocks_are_reproducible_from_the_documents():
    dm, _ = _datamodule(500, seed=3)
    tok = byte_tokenizer()
    for i, (name, (docs, held_out)) in enumerate(dm.source_documents().items()):
        # Calibration: the documents in the seeded order, packed until the blocks are full.
        assert torch.equal(dm.calibration[name], draw_blocks(docs, tok, 32, 4, dm.seed + i, name))
        # More blocks from the same order start with the same ones (what benchmarks/dpruner_search.py relies on).
        assert torch.equal(draw_blocks(docs, tok, 32, 6, dm.seed + i, name)[:4], dm.calibration[name])
        # Evaluation: the first eval_samples blocks of packing every held-out document, tokenising stopped early.
        assert torch.equal(dm.evaluation[name], pack_tokens(held_out, tok, 32)[:2])
        text = tok.decode(dm.calibration[name].reshape(-1).tolist())
        assert not any(d in text for d in held_out)  # no held-out document is calibration text


def test_too_short_text_still_fails_clearly():
    dm = CalibrationDataModule(general=TextSource(texts=["tiny", "texts"]), domain=TextSource(texts=_corpus(50, "d")),
                               eval_domain=TextSource(texts=_corpus(5, "e")), seq_len=32, num_samples=4, eval_samples=2)
    dm.use_tokenizer(byte_tokenizer())
    with pytest.raises(ValueError, match=r"general calibration text \(2 given texts\) is too short: it packs into 0 blocks"):
        dm.prepare_blocks()


def test_offline_hub_source_falls_back_in_under_a_second_with_one_warning(monkeypatch, caplog):
    import datasets  # noqa: F401  (imported beforehand: the import itself takes about a second)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("dpruner_lightning.assets.sample_corpus", lambda name: [f"{name} sample {i}" for i in range(3)])
    source = TextSource(dataset="dpruner-tests/no-such-dataset", fallback_sample="pubmed")
    with caplog.at_level(logging.INFO):
        t0 = time.perf_counter()
        docs = load_documents(source)
        seconds = time.perf_counter() - t0
    assert docs == ["pubmed sample 0", "pubmed sample 1", "pubmed sample 2"]
    assert seconds < 1.0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "HF_HUB_OFFLINE is set" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    with pytest.raises(RuntimeError, match="the hub is not reachable .HF_HUB_OFFLINE is set. and it is not in the local HF cache"):
        load_documents(TextSource(dataset="dpruner-tests/no-such-dataset"))  # no fallback: a clear error, as fast


def test_unreachable_hub_is_tried_once_without_retries(monkeypatch, caplog):
    import datasets  # noqa: F401
    import huggingface_hub.utils

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(sources._hub_state, "reachable", None)
    tries = []

    class Unreachable:
        def head(self, url, timeout):
            tries.append(timeout)
            raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Unreachable())
    monkeypatch.setattr("dpruner_lightning.assets.sample_corpus", lambda name: ["fallback text"])
    with caplog.at_level(logging.INFO):
        t0 = time.perf_counter()
        for _ in range(2):  # two hub sources: one probe
            assert load_documents(TextSource(dataset="dpruner-tests/no-such-dataset", fallback_sample="wikipedia")) == ["fallback text"]
        seconds = time.perf_counter() - t0
    assert tries == [sources.HUB_PROBE_TIMEOUT] and seconds < 2.0
    assert sum("not reachable" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records) == 1
    assert sum(r.levelno >= logging.WARNING for r in caplog.records) == 2  # one per source
