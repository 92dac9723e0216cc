"""`dpruner eval`: every model folder kind loads to the same weights, our tasks and the lm-eval bridge
(an lm-eval task from a local file, offline) agree with :mod:`evaluation` item by item, bad input fails
before compute."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dpruner_lightning import eval_cli, lm_eval_bridge
from dpruner_lightning.algorithms.structured import (
    apply_structured_pruning_,
    calibration_gradients,
    group_importance,
    plan_structured_pruning,
)
from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.eval_cli import load_model, resolve_model_folder, run_eval
from dpruner_lightning.evaluation import MultipleChoiceTask, evaluate_multiple_choice
from dpruner_lightning.export import export_hf_folder, save_sparse_model
from dpruner_lightning.models import byte_tokenizer
from dpruner_lightning.tasks import evaluate_task, pubmedqa

from .conftest import REPO, tiny_model
from .helpers import token_batches

# Multi-byte choices: their byte-token and character counts differ, so acc_norm (per character) and our
# per-token accuracy are told apart.
ITEMS = [
    {"q": "Is the sky blue?", "opts": ["yes", "no", "maybe so"]},
    {"q": "Two plus two", "opts": ["four", "cinq", "twenty-two"]},
    {"q": "Capital of France", "opts": ["Paris", "Rome", "Zürich"]},
    {"q": "Water boils at", "opts": ["100 °C", "50 C", "0 C"]},
    {"q": "Cats are", "opts": ["mammals", "birds", "fish"]},
    {"q": "The sun is a", "opts": ["star", "planète", "moon"]},
]
PROMPT = "Q: {q}\nA:"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _logits(model, ids=None):
    ids = token_batches(3, 1)[0] if ids is None else ids
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- loading every kind of folder ----------------------------------------------------------------------
def test_hf_sparse_run_and_structured_folders_load_the_same_weights(tmp_path):
    model, tok = tiny_model("llama"), byte_tokenizer()
    with torch.no_grad():  # half the target weights zero, as a pruned model
        for t in find_targets(model).values():
            t.weight_view()[:, ::2] = 0
    export_hf_folder(model, tok, tmp_path / "run" / "pruned_model")
    save_sparse_model(model, list(find_targets(model)), tok, tmp_path / "only_sparse" / "sparse_model")
    ref = _logits(model)
    for path, kind, resolved in [(tmp_path / "run" / "pruned_model", "hf", "run/pruned_model"),
                                 (tmp_path / "run", "hf", "run/pruned_model"),  # a run folder: its pruned_model/
                                 (tmp_path / "only_sparse", "sparse", "only_sparse/sparse_model")]:
        assert resolve_model_folder(path) == (tmp_path / resolved, kind)
        loaded, loaded_tok, info = load_model(str(path))
        assert info == {"path": str(tmp_path / resolved), "kind": kind} and loaded_tok("ab é")["input_ids"] == tok("ab é")["input_ids"]
        torch.testing.assert_close(_logits(loaded), ref, atol=1e-5, rtol=1e-5)

    gpt2 = tiny_model("gpt2")  # heads removed: transformers alone cannot reload it
    plan = plan_structured_pruning(group_importance(gpt2, calibration_gradients(gpt2, token_batches(1, 1))), 0.5)
    apply_structured_pruning_(gpt2, plan)
    export_hf_folder(gpt2, tok, tmp_path / "structured")
    loaded, _, info = load_model(str(tmp_path / "structured"))
    assert info["kind"] == "structured" and loaded.config.n_head == gpt2.config.n_head < 4
    torch.testing.assert_close(_logits(loaded), _logits(gpt2), atol=1e-5, rtol=1e-5)


def test_folders_without_a_model_or_a_tokenizer_fail_clearly(tmp_path, model):
    (tmp_path / "empty_run" / "version_0" / "pruned_model").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"holds no model.*\['version_0'\] are runs with an export: pass one"):
        resolve_model_folder(tmp_path / "empty_run")
    model.save_pretrained(tmp_path / "no_tok")
    with pytest.raises(FileNotFoundError, match="no tokenizer files.*pass --tokenizer"):
        load_model(str(tmp_path / "no_tok"))
    assert load_model(str(tmp_path / "no_tok"), tokenizer="bytes")[2]["kind"] == "hf"
    with pytest.raises(FileNotFoundError, match="model folder ./no/such/folder does not exist"):
        load_model("./no/such/folder")


# -- our tasks through the command ---------------------------------------------------------------------
def _pubmedqa_file(tmp_path):
    records = [{"QUESTION": f"Does drug {i} help?", "CONTEXTS": ["A small trial."], "final_decision": d}
               for i, d in enumerate(["yes", "no", "maybe", "yes", "no"])]
    path = tmp_path / "pqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def test_eval_command_scores_our_task_prints_and_writes_json(tmp_path, model, capsys):
    path, records = _pubmedqa_file(tmp_path)
    export_hf_folder(model, byte_tokenizer(), tmp_path / "m")
    out = tmp_path / "res" / "eval.json"
    result = run_eval(["--model", str(tmp_path / "m"), "--tasks", f"pubmedqa={path}", "--output", str(out)])
    expected = evaluate_task(model, byte_tokenizer(), pubmedqa(records))
    got = result["tasks"]["pubmedqa"]
    for key in ("accuracy", "accuracy_per_token", "accuracy_per_char", "score", "n"):
        assert got[key] == expected[key]
    assert got["score_metric"] == "accuracy_per_token" and 0.0 <= got["score"] <= 1.0 and got["source"] == "dpruner"
    assert json.loads(out.read_text())["tasks"]["pubmedqa"]["accuracy_per_char"] == expected["accuracy_per_char"]
    assert [p.name for p in out.parent.iterdir()] == ["eval.json"]  # atomic: no temporary file left
    table = capsys.readouterr().out
    assert f"| pubmedqa | dpruner | 5 | accuracy_per_token * | {expected['accuracy_per_token']:.4f} |" in table


def test_bad_input_fails_before_loading_the_model(tmp_path, monkeypatch):
    path, _ = _pubmedqa_file(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(eval_cli, "load_model", never)
    with pytest.raises(ValueError, match=r"unknown task 'mmlu'. Our tasks: billsum, casehold, pubmed_title, pubmedqa.*lm_eval:"):
        run_eval(["--model", "./nowhere", "--tasks", "mmlu"])
    with pytest.raises(ValueError, match=r"task 'casehold' needs its records: --tasks casehold=<file.jsonl>"):
        run_eval(["--model", "./nowhere", "--tasks", "casehold"])
    with pytest.raises(FileNotFoundError, match="model folder ./nowhere does not exist"):
        run_eval(["--model", "./nowhere", "--tasks", f"pubmedqa={path}"])
    with pytest.raises(ValueError, match="unknown model type 'lama'"):
        run_eval(["--model", "random:lama", "--tasks", f"pubmedqa={path}"])
    with pytest.raises(IsADirectoryError, match="--output .* is a folder"):
        run_eval(["--model", "random:llama", "--tasks", f"pubmedqa={path}", "--output", str(tmp_path)])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the [eval] extra were not installed
    with pytest.raises(lm_eval_bridge.MissingExtraError, match=r"optional extra \[eval\].*pip install 'dpruner-lightning\[eval\]'"):
        run_eval(["--model", "random:llama", "--tasks", "lm_eval:hellaswag"])


def test_cli_reports_an_unknown_task_in_one_line_with_exit_2():
    proc = subprocess.run([sys.executable, "-m", "dpruner_lightning.cli", "eval", "--model", "random:llama", "--tasks",
                           "pubmed_tittle"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "dpruner: error: unknown task 'pubmed_tittle'. Our tasks: billsum, casehold, pubmed_title" in proc.stderr


# -- lm-eval-harness through the bridge, on a local task file, offline ------------------------------------
def _lm_eval_task(tmp_path, records) -> None:
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{q}}}}\\nA:"
doc_to_choice: "{{{{opts}}}}"
doc_to_target: label
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
""")


def test_lm_eval_bridge_agrees_with_our_scoring_on_a_local_task(tmp_path, model, monkeypatch):
    pytest.importorskip("lm_eval", reason="the lm-eval bridge needs the optional extra [eval] (lm-eval)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = byte_tokenizer()
    ours_first = evaluate_multiple_choice(model, tok, MultipleChoiceTask("x", [{**r, "label": 0} for r in ITEMS], PROMPT, "opts",
                                                                         "label"), return_details=True)
    # items 0, 2, 5 labelled with our raw-score argmax, the others with another choice: accuracy 1/2 exactly
    records = []
    for i, (r, d) in enumerate(zip(ITEMS, ours_first["details"])):
        best = max(range(3), key=d["scores"].__getitem__)
        records.append({**r, "label": best if i in (0, 2, 5) else (best + 1) % 3})
    ours = evaluate_multiple_choice(model, tok, MultipleChoiceTask("x", records, PROMPT, "opts", "label"), return_details=True)
    assert ours["accuracy"] == 0.5

    _lm_eval_task(tmp_path, records)
    manager = lm_eval_bridge.task_manager([tmp_path / "tasks"], include_defaults=False)  # skip indexing lm-eval's own
    result = lm_eval_bridge.evaluate_lm_eval(model, tok, ["tiny_mc"], manager=manager, return_samples=True)["tiny_mc"]
    assert result["n"] == len(ITEMS) and result["source"] == "lm_eval" and result["score_metric"] == "acc"
    for key in ("acc", "acc_norm"):
        assert 0.0 <= result[key] <= 1.0 and result[f"{key}_stderr"] >= 0.0
    assert result["acc"] == ours["accuracy"] == 0.5  # same definition: raw log-likelihood argmax
    assert result["acc_norm"] == ours["accuracy_per_char"]  # lm-eval's acc_norm = our per-character accuracy
    assert ours["accuracy_per_char"] != ours["accuracy_per_token"]  # ... and not the per-token one (1/3 vs 1/2 here)
    for sample, detail in zip(sorted(result["samples"], key=lambda s: s["doc_id"]), ours["details"]):
        assert sample["target"] == detail["label"]
        assert sample["loglikelihoods"] == pytest.approx(detail["scores"], abs=1e-4)  # item by item, choice by choice
    assert not model.training


def test_eval_command_runs_an_lm_eval_task_next_to_ours(tmp_path, model, monkeypatch, capsys):
    pytest.importorskip("lm_eval", reason="the lm-eval bridge needs the optional extra [eval] (lm-eval)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = lm_eval_bridge.task_manager
    monkeypatch.setattr(lm_eval_bridge, "task_manager", lambda paths: real(paths, include_defaults=False))
    records = [{**r, "label": 0} for r in ITEMS]
    _lm_eval_task(tmp_path, records)
    export_hf_folder(model, byte_tokenizer(), tmp_path / "m")
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'tiny_mcq' \(did you mean tiny_mc\?\)"):
        run_eval(["--model", str(tmp_path / "m"), "--tasks", "lm_eval:tiny_mcq", "--lm-eval-include", str(tmp_path / "tasks")])
    result = run_eval(["--model", str(tmp_path / "m"), "--tasks", "lm_eval:tiny_mc", "--lm-eval-include",
                       str(tmp_path / "tasks"), "--limit", "4", "--output", str(tmp_path / "out.json")])
    got = json.loads((tmp_path / "out.json").read_text())["tasks"]["lm_eval:tiny_mc"]
    ours = evaluate_multiple_choice(model, byte_tokenizer(), MultipleChoiceTask("x", records[:4], PROMPT, "opts", "label"))
    assert got["n"] == 4 and got["acc"] == ours["accuracy"] and got["acc_norm"] == ours["accuracy_per_char"]
    assert result["versions"]["lm_eval"] and f"| lm_eval:tiny_mc | lm_eval | 4 | acc * | {got['acc']:.4f} |" in capsys.readouterr().out


def test_a_compressed_2_4_folder_loads_its_pruned_weights_not_random_ones(tmp_path):
    pytest.importorskip("compressed_tensors", reason="the 2:4 export needs the [deploy] extra (compressed-tensors)")
    from dpruner_lightning.deploy import export_compressed_24

    model, tok = tiny_model("llama"), byte_tokenizer()
    with torch.no_grad():  # 2:4: of every 4 inputs, the first two pruned
        for t in find_targets(model).values():
            w = t.weight_view()
            w.view(w.shape[0], -1, 4)[:, :, :2] = 0
    export_compressed_24(model, tok, tmp_path / "run" / "compressed_24_model")
    assert resolve_model_folder(tmp_path / "run") == (tmp_path / "run" / "compressed_24_model", "compressed_24")
    loaded, _, info = load_model(str(tmp_path / "run"))
    assert info["kind"] == "compressed_24"
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=1e-5)
