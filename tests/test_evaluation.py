"""Multiple-choice task accuracy: scores against a naive per-choice computation, rigged accuracies, errors, factories."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from dpruner_lightning import evaluation
from dpruner_lightning.data import TextSource
from dpruner_lightning.evaluation import (
    MultipleChoiceTask,
    bootstrap_ci,
    casehold,
    evaluate_multiple_choice,
    macro_f1,
    pubmedqa,
    score_choices,
)
from dpruner_lightning.models import byte_tokenizer

from .conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def naive_score(model, tok, context: str, cont: str, max_length: int = 512) -> float:
    """One forward per context + choice; sum of log_softmax at the continuation positions."""
    ctx_ids = tok(context, add_special_tokens=True)["input_ids"]
    cont_ids = tok(cont, add_special_tokens=False)["input_ids"]
    full = (ctx_ids + cont_ids)[-(max_length + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([full[:-1]])).logits[0].float(), -1)
    n = len(cont_ids)
    start = len(full) - 1 - n
    return sum(logp[start + j, cont_ids[j]].item() for j in range(n))


RECORDS = [
    {"q": "Is the sky blue?", "opts": ["yes", "no", "maybe so"]},
    {"q": "Two plus two", "opts": ["four", "five", "twenty-two"]},
    {"q": "Capital of France", "opts": ["Paris", "Rome", "Berlin"]},
    {"q": "Water boils at", "opts": ["100 C", "50 C", "0 C"]},
    {"q": "Cats are", "opts": ["mammals", "birds", "fish"]},
    {"q": "The sun is a", "opts": ["star", "planet", "moon"]},
]
PROMPT = "Q: {q}\nA:"


def _naive_all(model, tok, records=RECORDS):
    return [[naive_score(model, tok, PROMPT.format(**r), " " + o) for o in r["opts"]] for r in records]


def _argmax(xs):
    return max(range(len(xs)), key=xs.__getitem__)


def test_scores_match_naive(model, tok):
    for r in RECORDS[:3]:
        ctx, conts = PROMPT.format(**r), [" " + o for o in r["opts"]]
        batched = score_choices(model, tok, ctx, conts)
        for (s, n), c in zip(batched, conts):
            assert n == len(tok(c, add_special_tokens=False)["input_ids"])
            assert s == pytest.approx(naive_score(model, tok, ctx, c), abs=1e-4)


def test_left_truncation_matches_naive(model, tok):
    ctx, conts = "a fairly long context " * 4, [" x", " yz"]
    for (s, _), c in zip(score_choices(model, tok, ctx, conts, max_length=16), conts):
        assert s == pytest.approx(naive_score(model, tok, ctx, c, max_length=16), abs=1e-4)


def test_accuracy_on_hand_made_records(model, tok):
    naive = _naive_all(model, tok)
    # Records 0, 2, 5 labelled with the naive argmax (right), the others with another choice (wrong).
    records = []
    for i, (r, s) in enumerate(zip(RECORDS, naive)):
        best = _argmax(s)
        label = best if i in (0, 2, 5) else (best + 1) % 3
        # mix label kinds: int index and choice string
        records.append({**r, "answer": label if i % 2 else r["opts"][label]})
    task = MultipleChoiceTask("toy", records, PROMPT, "opts", "answer", normalize=False)
    out = evaluate_multiple_choice(model, tok, task, return_details=True)
    assert out["n"] == 6 and out["accuracy"] == pytest.approx(3 / 6)
    assert out["score"] == out["accuracy"]
    for d, s in zip(out["details"], naive):
        assert d["scores"] == pytest.approx(s, abs=1e-4)


def test_rigged_right_and_wrong(model, tok):
    naive = _naive_all(model, tok)
    right = [{**r, "y": _argmax(s)} for r, s in zip(RECORDS, naive)]
    wrong = [{**r, "y": min(range(3), key=s.__getitem__)} for r, s in zip(RECORDS, naive)]
    norm_right = [{**r, "y": _argmax([x / len(tok(" " + o)["input_ids"]) for x, o in zip(s, r["opts"])])}
                  for r, s in zip(RECORDS, naive)]
    assert evaluate_multiple_choice(model, tok, MultipleChoiceTask("r", right, PROMPT, "opts", "y"))["accuracy"] == 1.0
    assert evaluate_multiple_choice(model, tok, MultipleChoiceTask("w", wrong, PROMPT, "opts", "y"))["accuracy"] == 0.0
    out = evaluate_multiple_choice(model, tok, MultipleChoiceTask("n", norm_right, PROMPT, "opts", "y"))
    assert out["accuracy_per_token"] == 1.0 and out["score"] == 1.0 and out["score_metric"] == "accuracy_per_token"


def test_length_normalisation(model, tok):
    records = [{"q": "Say it", "y": 0}]
    task = MultipleChoiceTask("len", records, PROMPT, [" hello", " hello hello"], "y")
    out = evaluate_multiple_choice(model, tok, task, return_details=True)
    (d,) = out["details"]
    assert d["n_tokens"] == [6, 12]
    raw, norm = d["scores"], [s / n for s, n in zip(d["scores"], d["n_tokens"])]
    assert raw[1] < raw[0]  # more tokens: lower total log-likelihood
    assert out["accuracy"] == float(_argmax(raw) == 0) and out["accuracy_per_token"] == float(_argmax(norm) == 0)


# Choices whose token and character counts rank differently under a multi-byte character: "é" is 2 bytes
# (2 byte tokens) but 1 character, so per token and per character pick from other divisors.
CHAR_RECORDS = [{"q": q, "opts": ["éé", "ab", "abcd", "ééé x"]} for q in ("Pick one", "Another", "Third", "Last one")]


def test_per_character_accuracy_is_lm_evals_acc_norm(model, tok):
    naive = _naive_all(model, tok, CHAR_RECORDS)
    chars = [len(o) for o in CHAR_RECORDS[0]["opts"]]  # lm-eval: len(choice), the delimiter not counted
    assert chars == [2, 2, 4, 5]
    by_char = [{**r, "y": _argmax([x / c for x, c in zip(s, chars)])} for r, s in zip(CHAR_RECORDS, naive)]
    out = evaluate_multiple_choice(model, tok, MultipleChoiceTask("c", by_char, PROMPT, "opts", "y", normalize="char"),
                                   return_details=True)
    assert out["accuracy_per_char"] == 1.0 and out["score_metric"] == "accuracy_per_char" and out["score"] == 1.0
    assert all(d["n_chars"] == chars for d in out["details"])
    assert out["details"][0]["n_tokens"] == [5, 3, 5, 9]  # bytes, with the leading space
    by_token = [_argmax([x / n for x, n in zip(s, (5, 3, 5, 9))]) for s in naive]
    assert by_token != [r["y"] for r in by_char]  # the two divisors pick differently here: the test tells them apart
    assert out["accuracy_per_token"] == sum(p == r["y"] for p, r in zip(by_token, by_char)) / 4
    wrong = [{**r, "y": (r["y"] + 1) % 4} for r in by_char]
    assert evaluate_multiple_choice(model, tok, MultipleChoiceTask("w", wrong, PROMPT, "opts", "y"))["accuracy_per_char"] == 0.0


def test_choice_characters_drop_only_the_delimiter():
    task = MultipleChoiceTask("d", [], PROMPT, "opts", "y")
    assert task.choice_chars(" yes") == 3 and task.choice_chars("yes") == 3 and task.choice_chars("  two") == 4
    assert task.choice_chars(" ") == 1  # never a division by zero
    assert MultipleChoiceTask("e", [], PROMPT, "opts", "y", delimiter="\n").choice_chars("\nno") == 2


def test_normalize_settings_old_booleans_and_errors():
    task = MultipleChoiceTask("n", [], PROMPT, "opts", "y")
    assert task.normalize == "token" and task.headline == "accuracy_per_token"
    assert MultipleChoiceTask("n", [], PROMPT, "opts", "y", normalize=True).headline == "accuracy_per_token"
    assert MultipleChoiceTask("n", [], PROMPT, "opts", "y", normalize=False).headline == "accuracy"
    assert MultipleChoiceTask("n", [], PROMPT, "opts", "y", normalize="char").headline == "accuracy_per_char"
    assert MultipleChoiceTask("n", [], PROMPT, "opts", "y", normalize="none", calibrate=True).headline == "accuracy_calibrated"
    with pytest.raises(ValueError, match=r"task 'n': normalize must be one of \['char', 'none', 'token'\]"):
        MultipleChoiceTask("n", [], PROMPT, "opts", "y", normalize="bytes")


def test_results_saved_under_the_old_name_load_renamed(caplog):
    old = {"task": "pubmed_title", "n": 3, "accuracy": 0.5, "accuracy_norm": 0.25, "accuracy_norm_ci": [0.0, 0.5],
           "macro_f1_norm": 0.2, "score": 0.25, "score_ci": [0.0, 0.5], "score_metric": "accuracy_norm"}
    with caplog.at_level(logging.WARNING, logger="dpruner_lightning.evaluation"):
        new = evaluation.upgrade_metrics(old, "test-results.json")
        evaluation.upgrade_metrics(old, "test-results.json")
    assert new == {"task": "pubmed_title", "n": 3, "accuracy": 0.5, "accuracy_per_token": 0.25,
                   "accuracy_per_token_ci": [0.0, 0.5], "macro_f1_per_token": 0.2, "score": 0.25, "score_ci": [0.0, 0.5],
                   "score_metric": "accuracy_per_token"}
    assert "accuracy_norm" in old  # the input is not modified
    assert caplog.text.count("deprecated metric name 'accuracy_norm'") == 1 and "test-results.json" in caplog.text
    current = {"accuracy": 1.0, "score_metric": "accuracy"}
    assert evaluation.upgrade_metrics(current) == current


def test_restores_training_mode(model, tok):
    model.train()
    try:
        evaluate_multiple_choice(model, tok, MultipleChoiceTask("t", [{**RECORDS[0], "l": 0}], PROMPT, "opts", "l"))
        assert model.training
    finally:
        model.eval()


def test_errors(model, tok):
    with pytest.raises(ValueError, match="no records"):
        evaluate_multiple_choice(model, tok, MultipleChoiceTask("e", [], PROMPT, "opts", "l"))
    with pytest.raises(ValueError, match="out of range"):
        MultipleChoiceTask("e", [{**RECORDS[0], "l": 3}], PROMPT, "opts", "l").instances()
    with pytest.raises(ValueError, match="not among the choices"):
        MultipleChoiceTask("e", [{**RECORDS[0], "l": "banana"}], PROMPT, "opts", "l").instances()
    with pytest.raises(ValueError, match=r"'question'.*fields: \['l', 'opts', 'q'\]"):
        MultipleChoiceTask("e", [{**RECORDS[0], "l": 0}], "{question}", "opts", "l").instances()
    with pytest.raises(ValueError, match="choice template field 'b'"):
        MultipleChoiceTask("e", [{**RECORDS[0], "l": 0}], PROMPT, [" {q}", " {b}"], "l").instances()
    with pytest.raises(ValueError, match="label field 'answer'"):
        MultipleChoiceTask("e", [RECORDS[0]], PROMPT, "opts", "answer").instances()
    with pytest.raises(ValueError, match="choices field 'options'"):
        MultipleChoiceTask("e", [{**RECORDS[0], "l": 0}], PROMPT, "options", "l").instances()


def test_pubmedqa_factory():
    rec = {"pubid": 1, "question": "Does X cause Y?",
           "context": {"contexts": ["First part.", "Second part."], "labels": ["A", "B"], "meshes": []},
           "long_answer": "...", "final_decision": "maybe"}
    ((ctx, conts, label),) = pubmedqa([rec]).instances()
    assert ctx == "Question: Does X cause Y?\nContext: First part. Second part.\nAnswer:"
    assert conts == [" yes", " no", " maybe"] and label == 2
    assert rec["context"]["contexts"] == ["First part.", "Second part."]  # input records untouched
    ((ctx, _, label),) = pubmedqa([{**rec, "context": "Plain.", "final_decision": "no"}]).instances()
    assert ctx.endswith("Context: Plain.\nAnswer:") and label == 1


def test_casehold_factory():
    rec = {"example_id": 0, "citing_prompt": "Smith v. Jones (<HOLDING>)",
           **{f"holding_{i}": f"holding {i}" for i in range(5)}, "label": 3}
    task = casehold([rec, {**rec, "label": "1"}])
    (ctx, conts, label), (_, _, label2) = task.instances()
    assert ctx == "Smith v. Jones (<HOLDING>)"
    assert conts == [f" holding {i}" for i in range(5)] and label == 3 and label2 == 1


def test_from_local_jsonl(tmp_path, model, tok):
    path = tmp_path / "recs.jsonl"
    path.write_text("\n".join(json.dumps({**r, "l": 0}) for r in RECORDS[:2]) + "\n")
    task = MultipleChoiceTask.from_source("file", TextSource(path=str(path)), PROMPT, "opts", "l")
    assert len(task.records) == 2
    out = evaluate_multiple_choice(model, tok, task)
    assert out["n"] == 2 and 0.0 <= out["accuracy"] <= 1.0


def test_pubmedqa_factory_reads_the_pqa_l_export():
    rec = {"QUESTION": "Does X cause Y?", "CONTEXTS": ["One.", "Two."], "final_decision": "yes", "LONG_ANSWER": "..."}
    ((ctx, _, label),) = pubmedqa([rec]).instances()
    assert ctx == "Question: Does X cause Y?\nContext: One. Two.\nAnswer:" and label == 0


# -- KV-cached scoring ---------------------------------------------------------------------------------
CHOICES = [" x", " yes indeed", " maybe, or maybe not at all", " no"]  # 2 to 27 tokens


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("max_length", [512, 40, 28])  # left truncation, different per choice length (28: 1 context token)
def test_cached_scores_equal_per_choice_full_forwards(family, max_length, tok):
    model = tiny_model(family)
    ctx = "Question: which answer fits the context given here?\nAnswer:"
    cached = score_choices(model, tok, ctx, CHOICES, max_length=max_length, use_cache=True)
    full = score_choices(model, tok, ctx, CHOICES, max_length=max_length, use_cache=False)
    for (s, n), (f, m), c in zip(cached, full, CHOICES):
        assert n == m == len(tok(c, add_special_tokens=False)["input_ids"])
        assert s == pytest.approx(naive_score(model, tok, ctx, c, max_length), abs=1e-4)
        assert f == pytest.approx(s, abs=1e-4)
    auto = score_choices(model, tok, ctx, CHOICES, max_length=max_length)
    assert evaluation._CACHE_CHECKED[model] is True  # the one-time check accepted the cached path
    assert [a for a, _ in auto] == pytest.approx([s for s, _ in cached], abs=1e-4)


class NoCache(torch.nn.Module):
    """A model whose outputs carry no KV cache (as some custom architectures): the cached path cannot run."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, **ignored):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


def test_cache_failure_falls_back_to_full_forwards(model, tok, caplog):
    wrapped = NoCache(model)
    ctx = "Q: fall back?\nA:"
    with caplog.at_level(logging.DEBUG, logger="dpruner_lightning.evaluation"):
        first = score_choices(wrapped, tok, ctx, CHOICES)
        again = score_choices(wrapped, tok, ctx, CHOICES)
    assert evaluation._CACHE_CHECKED[wrapped] is False
    assert "KV-cached choice scoring failed" in caplog.text and "using full forwards" in caplog.text
    for (a, _), (b, _), c in zip(first, again, CHOICES):
        assert a == pytest.approx(naive_score(model, tok, ctx, c), abs=1e-4) and b == pytest.approx(a, abs=1e-5)
    with pytest.raises(TypeError, match="no repeatable KV cache"):
        score_choices(wrapped, tok, ctx, CHOICES, use_cache=True)


# -- metrics -------------------------------------------------------------------------------------------
def test_macro_f1_on_a_hand_made_confusion_matrix():
    # rows = true class, columns = predicted class:   0  1  2
    #                                             0 [ 3, 1, 0 ]
    #                                             1 [ 1, 2, 1 ]
    #                                             2 [ 0, 0, 0 ]  (class 2 is only ever predicted)
    pairs = [(0, 0)] * 3 + [(0, 1)] + [(1, 0)] + [(1, 1)] * 2 + [(1, 2)]
    labels, preds = [y for y, _ in pairs], [p for _, p in pairs]
    f1_0 = 2 * 3 / (2 * 3 + 1 + 1)  # tp 3, fp 1 (a true 1), fn 1 (predicted 1)
    f1_1 = 2 * 2 / (2 * 2 + 1 + 2)  # tp 2, fp 1, fn 2
    f1_2 = 0.0  # tp 0, fp 1
    assert macro_f1(labels, preds) == pytest.approx((f1_0 + f1_1 + f1_2) / 3)
    assert macro_f1([0, 1, 1], [0, 1, 1]) == 1.0
    assert macro_f1([1, 1, 1, 1], [1, 1, 1, 1]) == 1.0  # one class present: F1 over it alone
    with pytest.raises(ValueError, match="as many predictions"):
        macro_f1([0, 1], [0])


def test_bootstrap_interval_is_seeded_and_contains_the_estimate():
    correct = [True] * 27 + [False] * 13
    lo, hi = bootstrap_ci(correct)
    assert lo < 27 / 40 < hi and 0.0 <= lo and hi <= 1.0
    assert bootstrap_ci(correct) == [lo, hi]  # same seed, same interval
    assert bootstrap_ci(correct, seed=1) != [lo, hi]
    assert bootstrap_ci([0.5] * 10) == pytest.approx([0.5, 0.5])
    narrow = bootstrap_ci(correct * 10)
    assert narrow[1] - narrow[0] < hi - lo  # more items, tighter interval
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_metrics_and_calibration(model, tok, monkeypatch):
    naive = _naive_all(model, tok)
    records = [{**r, "y": _argmax(s)} for r, s in zip(RECORDS, naive)]
    calls = []
    real = evaluation.score_choices

    def counting(model_, tok_, context, conts, *args, **kwargs):
        calls.append(context)
        return real(model_, tok_, context, conts, *args, **kwargs)

    monkeypatch.setattr(evaluation, "score_choices", counting)
    fixed = MultipleChoiceTask("fixed", records, PROMPT, [" mammals", " birds", " fish"], "y", calibrate=True,
                               neutral_prompt="Answer:")
    out = evaluate_multiple_choice(model, tok, fixed, return_details=True)
    assert calls.count("Answer:") == 1  # a fixed choice list: the neutral prompt is scored once per task
    neutral = [s for s, _ in real(model, tok, "Answer:", [" mammals", " birds", " fish"])]
    for d in out["details"]:
        assert d["neutral_scores"] == pytest.approx(neutral, abs=1e-4)
    expected = sum(_argmax([s - b for s, b in zip(d["scores"], neutral)]) == d["label"] for d in out["details"]) / 6
    assert out["accuracy_calibrated"] == pytest.approx(expected)
    assert out["score_metric"] == "accuracy_calibrated" and out["score"] == out["accuracy_calibrated"]
    for key in ("macro_f1", "macro_f1_per_token", "macro_f1_per_char", "macro_f1_calibrated"):
        assert 0.0 <= out[key] <= 1.0
    for key in ("accuracy_ci", "accuracy_per_token_ci", "accuracy_per_char_ci", "accuracy_calibrated_ci", "score_ci"):
        assert out[key][0] <= out[key][1]
    calls.clear()
    evaluate_multiple_choice(model, tok, MultipleChoiceTask("per-record", records, PROMPT, "opts", "y", calibrate=True))
    assert calls.count("Answer:") == len(RECORDS)  # one neutral scoring per distinct choice list
    right = evaluate_multiple_choice(model, tok, MultipleChoiceTask("r", records, PROMPT, "opts", "y", normalize=False))
    assert right["accuracy"] == 1.0 and right["macro_f1"] == 1.0 and right["accuracy_ci"] == [1.0, 1.0]
    assert "accuracy_calibrated" not in right and right["score_metric"] == "accuracy"
