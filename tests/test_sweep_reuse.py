"""Sweeps compute a method's importance once and prune every sparsity level from it (dpruner_lightning.reprune)."""

from __future__ import annotations

import collections
import contextlib
import json
import math
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

import dpruner_lightning.module as module_py
from dpruner_lightning.benchmark import ExperimentRunner
from dpruner_lightning.comparison import run_subcommand
from dpruner_lightning.comparison_rows import Row, execution_order, row_folder
from dpruner_lightning.methods import DPrunerMethod

from .conftest import REPO, SMOKE, TINY

LEVELS = [0.1, 0.2, 0.3, 0.4, 0.5]


@pytest.fixture
def pass_counter(monkeypatch) -> collections.Counter:
    """Counts D-PRUNER's passes (``start_pass`` by pass name) and the micro-batches of every pass
    (``calibration_step`` as the module calls it)."""
    counts: collections.Counter = collections.Counter()
    start_pass, step = DPrunerMethod.start_pass, module_py.calibration_step

    def counting_start_pass(self, p):
        counts[p.name] += 1
        return start_pass(self, p)

    def counting_step(model, method, p, input_ids, **kw):
        counts["micro_batches"] += 1
        return step(model, method, p, input_ids, **kw)

    monkeypatch.setattr(DPrunerMethod, "start_pass", counting_start_pass)
    monkeypatch.setattr(module_py, "calibration_step", counting_step)
    return counts


def _sweep_config(tmp_path: Path, name: str, sparsities: list[float], methods: list, save_artifacts: bool = False) -> Path:
    """configs/sweep_smoke.yaml, smaller (4 calibration blocks of 32 tokens, 2 per micro-batch), no dense row."""
    config = yaml.safe_load((REPO / "configs" / "sweep_smoke.yaml").read_text())
    config["data"].update(seq_len=32, num_samples=4, batch_size=2, eval_samples=4)
    config["sweep"] = {"sparsities": sparsities, "methods": methods, "include_dense": False, "save_artifacts": save_artifacts}
    config["model"]["output"] = {"save_importance": False, "export_model": False}  # the masks only, when saved
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _sweep(config: Path, out: Path) -> list[dict]:
    with contextlib.chdir(REPO):  # the config's data paths are relative to the repository
        return run_subcommand("sweep", ["--config", str(config), "--output_dir", str(out)])


def test_execution_order_runs_each_group_together_in_first_row_order():
    groups = [None, "a", "b", "a", None, "b", "a"]
    assert execution_order(groups, list(range(7))) == [[0], [1, 3, 6], [2, 5], [4]]
    assert execution_order(groups, [3, 4, 5, 6]) == [[3, 6], [4], [5]]  # rows kept from an earlier run are left out


def test_a_sparsity_sweep_of_5_levels_costs_one_importance_computation(tmp_path, pass_counter, caplog):
    config = _sweep_config(tmp_path, "five", LEVELS, [{"name": "d_pruner", "init_args": {"alpha": 0.01}}])
    with caplog.at_level("INFO", logger="dpruner_lightning.comparison"):
        rows = _sweep(config, tmp_path / "out")
    # One general pass and one dual pass (2 micro-batches each), not five of each.
    assert (pass_counter["general"], pass_counter["dual"], pass_counter["micro_batches"]) == (1, 1, 4)
    assert [r["sparsity_requested"] for r in rows] == LEVELS
    assert all("error" not in r and math.isfinite(r["ppl_domain"]) for r in rows)
    assert [round(r["sparsity_targets"], 3) for r in rows] == LEVELS
    first, *rest = rows
    assert "passes_from" not in first and {"general", "dual", "mask"} <= set(first["seconds_phases"])
    for row in rest:  # honest seconds: the shared passes are named, not counted again
        assert row["passes_from"] == first["method"] and set(row["seconds_phases"]) == {"mask"}
        assert row["seconds_passes_shared"] == pytest.approx(first["seconds_phases"]["general"] + first["seconds_phases"]["dual"], abs=0.01)
        assert json.loads((Path(row["log_dir"]) / "summary.json").read_text())["sparsity_target"] == row["sparsity_requested"]
    table = (tmp_path / "out" / "sweep.md").read_text()
    assert f"reused those of {first['method']}" in table
    progress = [m for m in caplog.messages if m.startswith("row ")]
    assert progress[:2] == ["row 1/5: d_pruner s=0.1", "row 2/5: d_pruner s=0.2 (passes of 'd_pruner s=0.1')"]

    # Resume: the same sweep again runs nothing; with the last three rows lost, one fit serves those three.
    pass_counter.clear()
    assert _sweep(config, tmp_path / "out") == rows and not pass_counter
    results = json.loads((tmp_path / "out" / "sweep.json").read_text())
    results["rows"] = results["rows"][:2]
    (tmp_path / "out" / "sweep.json").write_text(json.dumps(results))
    again = _sweep(config, tmp_path / "out")
    assert (pass_counter["general"], pass_counter["dual"]) == (1, 1)
    assert again[:2] == rows[:2] and [r.get("passes_from") for r in again[2:]] == [None, "d_pruner s=0.3", "d_pruner s=0.3"]
    assert [r["ppl_domain"] for r in again] == [r["ppl_domain"] for r in rows]  # the same numbers, however they were run


def test_experiment_runner_sparsity_sweep_computes_importance_once(tmp_path, pass_counter):
    paragraphs = [p.strip() for name in ("general.txt", "domain.txt") for p in (SMOKE / name).read_text().split("\n\n") if p.strip()]
    general, domain = paragraphs[: len(paragraphs) // 2], paragraphs[len(paragraphs) // 2:]
    kw = dict(tokenizer="bytes", seq_len=32, num_samples=4, batch_size=2, eval_samples=2, **TINY["llama"])
    rows = ExperimentRunner(tmp_path).run_sparsity_sweep("random:llama", general, domain[:-2], domain[-2:], LEVELS,
                                                         domain="medical", **kw)
    assert [r["method"] for r in rows] == ["dense"] + [f"d_pruner s={s:g}" for s in LEVELS]
    assert (pass_counter["general"], pass_counter["dual"], pass_counter["micro_batches"]) == (1, 1, 4)
    assert [round(r["sparsity_targets"], 3) for r in rows[1:]] == LEVELS
    assert all(r.get("passes_from") == "d_pruner s=0.1" for r in rows[2:])


#: A row run inside a group must equal the same row run alone: D-PRUNER (weights tuned by its dual pass;
#: W0 and the fine-tuned weights), SparseGPT (replays its batches in prune), a reconstructing method and
#: a structured one (the model is reloaded).
EQUALITY_METHODS = [
    {"name": "d_pruner", "init_args": {"alpha": 0.01}},
    {"name": "d_pruner_kept", "class_path": "dpruner_lightning.methods.DPrunerMethod",
     "init_args": {"alpha": 0.01, "keep_updated_weights": True}},
    {"name": "sparsegpt"},
    {"name": "magnitude_obs", "class_path": "dpruner_lightning.methods.MagnitudeMethod", "init_args": {"reconstruct": "obs"}},
    {"name": "llm_pruner"},
]


def test_a_row_run_in_a_group_equals_the_same_row_run_alone(tmp_path, pass_counter):
    group = _sweep(_sweep_config(tmp_path, "group", [0.3, 0.5], EQUALITY_METHODS, save_artifacts=True), tmp_path / "group")
    assert (pass_counter["general"], pass_counter["dual"]) == (2, 2)  # one of each per D-PRUNER setting
    alone = _sweep(_sweep_config(tmp_path, "alone", [0.5], EQUALITY_METHODS, save_artifacts=True), tmp_path / "alone")
    shared = {r["method"]: r for r in group if r.get("passes_from")}
    assert set(shared) == {f"{m['name']} s=0.5" for m in EQUALITY_METHODS}
    for row in alone:
        twin = shared[row["method"]]
        assert "error" not in row and "error" not in twin, (row, twin)
        # Bit-equal perplexities: the same kept weights (reconstruction, the fine-tuned weights) as well as masks.
        assert (twin["ppl_domain"], twin["ppl_general"]) == (row["ppl_domain"], row["ppl_general"]), row["method"]
        assert twin["parameters"] == row["parameters"] and twin["sparsity_targets"] == row["sparsity_targets"]
        folders = [Path(r["log_dir"]) for r in (row, twin)]
        if not row["method"].startswith("llm_pruner"):  # structured: no masks, shapes shrank (parameters above)
            masks = [load_file(str(f / "masks.safetensors")) for f in folders]
            assert masks[0].keys() == masks[1].keys() and all(bool((masks[0][k] == masks[1][k]).all()) for k in masks[0])
    assert row_folder(Row("d_pruner s=0.5", None)) == Path(shared["d_pruner s=0.5"]["log_dir"]).name
