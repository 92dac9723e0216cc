"""`dpruner compare` / `dpruner sweep`, the BenchmarkSuite / ExperimentRunner API, and the configs."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import yaml

from dpruner_lightning.benchmark import BenchmarkSuite, ExperimentRunner
from dpruner_lightning.cli import main
from dpruner_lightning.comparison import load_config, run_subcommand, validate_config
from dpruner_lightning.data import split_by_document
from dpruner_lightning.methods import METHODS
from dpruner_lightning.methods.magnitude import MagnitudeMethod

from .conftest import REPO, SMOKE, TINY

COMPARE_ROWS = ["dense", "magnitude", "wanda", "sparsegpt", "llm_pruner", "d_pruner", "d_pruner_obs"]
UNSTRUCTURED = {"magnitude", "wanda", "sparsegpt", "d_pruner", "d_pruner_obs"}


class Broken(MagnitudeMethod):
    """A method that fails while pruning, to check that one failed row does not lose the others."""

    def prune(self, spec):
        raise RuntimeError("boom")


def _texts(name: str) -> list[str]:
    return [p.strip() for p in (SMOKE / name).read_text().split("\n\n") if p.strip()]


def _variant(tmp_path: Path, src: str, **sections) -> Path:
    """A copy of configs/<src> with some top-level sections replaced (data paths stay repo-relative)."""
    config = yaml.safe_load((REPO / "configs" / src).read_text())
    config.update(sections)
    path = tmp_path / f"variant_{len(list(tmp_path.glob('variant_*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    with contextlib.chdir(REPO):
        main(["compare", "--config", "configs/compare_smoke.yaml", "--output_dir", str(out)])
    return out


def test_compare_writes_one_row_per_method(compare_run):
    doc = json.loads((compare_run / "comparison.json").read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert [r["method"] for r in doc["rows"]] == COMPARE_ROWS
    for name, row in rows.items():
        assert "error" not in row, row
        assert math.isfinite(row["ppl_domain"]) and math.isfinite(row["ppl_general"]), name
        assert row["peak_memory_bytes"] > 0 and row["seconds_total"] > 0
        summary = json.loads((Path(row["log_dir"]) / "summary.json").read_text())
        assert summary["status"] == "complete", name
        stage = "dense" if name == "dense" else "pruned"
        assert summary["perplexity"][stage]["domain"] == pytest.approx(row["ppl_domain"]), name
    assert rows["dense"]["sparsity_targets"] == 0 and rows["dense"]["compression_ratio"] == 1.0
    for name in UNSTRUCTURED:
        assert rows[name]["sparsity_targets"] == pytest.approx(0.5, abs=1e-3), name
        assert 1.3 < rows[name]["compression_ratio"] < 1.9, name  # bitmask + kept fp32 values
        assert rows[name]["seconds_phases"], name
    structured = rows["llm_pruner"]
    assert structured["sparsity_targets"] == pytest.approx(0.5, abs=0.05)
    assert structured["parameters"]["all"] < structured["parameters"]["all_dense"]
    assert structured["compression_ratio"] == pytest.approx(structured["parameters"]["all_dense"] / structured["parameters"]["all"])
    # Every row saw the same data and model settings: only the method (and mask) sections differ.
    configs = {n: yaml.safe_load((Path(r["log_dir"]) / "config.yaml").read_text()) for n, r in rows.items()}
    for name, config in configs.items():
        assert config["data"] == configs["dense"]["data"], name
        assert config["model"]["model"] == configs["dense"]["model"]["model"], name


def test_compare_markdown_and_tensorboard_text(compare_run):
    table = [line for line in (compare_run / "comparison.md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == COMPARE_ROWS  # header, then one line per row
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(compare_run.glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0]), size_guidance={"tensors": 0})
    acc.Reload()
    assert "comparison/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("comparison/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "d_pruner_obs" in text and "llm_pruner" in text


def test_sweep_smoke_config_gives_exact_sparsities(tmp_path):
    with contextlib.chdir(REPO):
        rows = run_subcommand("sweep", ["--config", "configs/sweep_smoke.yaml", "--output_dir", str(tmp_path)])
    assert rows[0]["method"] == "dense"
    by_method: dict[str, list[tuple[float, float]]] = {}
    for row in rows[1:]:
        assert "error" not in row and math.isfinite(row["ppl_domain"]), row
        key = row["method"].split(" s=")[0] + str(row.get("lambda_reg", ""))
        by_method.setdefault(key, []).append((row["sparsity_requested"], row["sparsity_targets"]))
    assert {"magnitude", "wanda", "sparsegpt", "llm_pruner", "d_pruner0.0", "d_pruner1.0"} == set(by_method)
    for key, pairs in by_method.items():
        assert [s for s, _ in pairs] == [0.1, 0.3, 0.5]
        realised = [r for _, r in pairs]
        assert realised == sorted(realised), key
        # Rounding: whole heads/channels (LLM-Pruner), half a weight per 64-wide row (Wanda), else per matrix.
        tolerance = {"llm_pruner": 0.1, "wanda": 0.5 / 64}.get(key, 1e-3)
        assert all(abs(s - r) <= tolerance for s, r in pairs), (key, pairs)
    assert (tmp_path / "sweep.md").exists() and json.loads((tmp_path / "sweep.json").read_text())["rows"] == rows


def test_benchmark_suite_api(tmp_path):
    suite = BenchmarkSuite("random:llama", output_dir=tmp_path, tokenizer="bytes", seq_len=32, num_samples=4,
                           batch_size=2, eval_samples=4, **TINY["llama"])
    general, domain = _texts("general.txt"), _texts("domain.txt")
    results = suite.compare_pruning_methods(open_domain_texts=general, domain_texts=domain[:-2], test_texts=domain[-2:],
                                            sparsity_ratio=0.5)
    assert [r["method"] for r in results] == ["dense", *METHODS]
    assert all("error" not in r and math.isfinite(r["ppl_domain"]) for r in results)
    report = suite.generate_comparison_report(results)
    for name in ["dense", *METHODS]:
        assert f"| {name} |" in report
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["dense", *METHODS] and saved["rows"] == results
    assert not (tmp_path / "data").exists()  # the texts are handed over in memory, not written out
    # The same call again keeps the finished rows (same config keys) instead of recomputing them.
    again = suite.compare_pruning_methods(open_domain_texts=general, domain_texts=domain[:-2], test_texts=domain[-2:],
                                          sparsity_ratio=0.5)
    assert again == results
    with pytest.raises(TypeError, match="unknown option 'not_an_option'"):
        BenchmarkSuite("smollm2-135m", not_an_option=1)


def test_experiment_runner_hyperparameter_sweep(tmp_path):
    runner = ExperimentRunner(tmp_path)
    general, domain = _texts("general.txt"), _texts("domain.txt")
    kw = dict(tokenizer="bytes", seq_len=32, num_samples=2, batch_size=2, eval_samples=2, **TINY["llama"])
    rows = runner.run_hyperparameter_sweep("random:llama", general, domain[:-2], domain[-2:], lambda_values=[0.0, 1.0],
                                           alpha_values=[1e-3], domain="medical", **kw)
    assert [r["method"] for r in rows] == ["dense", "d_pruner s=0.5 lambda_reg=0 alpha=0.001", "d_pruner s=0.5 lambda_reg=1 alpha=0.001"]
    assert (tmp_path / "medical_hyperparameters" / "sweep.md").exists()
    with pytest.raises(TypeError, match="unknown option"):
        runner.run_sparsity_sweep("smollm2-135m", general, domain, domain, [0.5], not_an_option=1)


def test_a_failed_row_is_reported_and_the_others_kept(tmp_path):
    methods = [{"name": "dense"}, {"name": "broken", "class_path": f"{__name__}.Broken"}, {"name": "magnitude"}]
    path = _variant(tmp_path, "compare_smoke.yaml", compare={"methods": methods})
    with contextlib.chdir(REPO), pytest.raises(RuntimeError, match=r"1 row\(s\) failed: \['broken'\]"):
        run_subcommand("compare", ["--config", str(path), "--output_dir", str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out" / "comparison.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "broken", "magnitude"]
    assert "boom" in rows[1]["error"] and "error" not in rows[2]


@pytest.mark.parametrize(
    "section, message",
    [
        ({"compare": {"methods": []}}, "compare.methods is empty"),
        ({"compare": {"methods": ["dense", "wandaa"]}}, "unknown pruning method 'wandaa'; valid names: d_pruner"),
        ({"compare": {"methods": ["wanda", "wanda"]}}, "duplicate row names"),
        ({"compare": {"method": ["wanda"]}}, "unknown keys in the 'compare' section"),
        ({"compare": {"methods": [{"name": "d_pruner", "init_args": {"alpha": -1}}]}}, "alpha must be >= 0"),
        ({"compare": {"methods": [{"name": "sparsegpt", "mask": {"granularity": "row"}}]}}, "SparseGPT"),
        ({"sweep": {"sparsities": []}}, "non-empty list"),
        ({"sweep": {"sparsities": [0.5, 1.2]}}, "distinct numbers in"),
        ({"sweep": {"sparsities": [0.5], "methods": ["wanda"], "lambda_values": [0.1]}}, "no method of the sweep is D-PRUNER"),
        ({"compare": {"tasks": [{"name": "nope", "path": "x.jsonl"}]}}, r"compare.tasks\[0\]: unknown task preset 'nope'"),
        ({"compare": {"tasks": [{"name": "casehold", "path": "missing.jsonl"}]}}, r"compare.tasks\[0\] \(casehold\): path: no text file"),
        ({"sweep": {"sparsities": [0.5], "tasks": [{"name": "billsum"}]}}, r"sweep.tasks\[0\] \(billsum\): .*add path"),
    ],
)
def test_bad_sections_fail_before_any_compute(tmp_path, section, message):
    name = next(iter(section))
    path = _variant(tmp_path, "compare_smoke.yaml", **section)
    if name == "sweep":
        config = yaml.safe_load(path.read_text())
        config.pop("compare")
        path.write_text(yaml.safe_dump(config))
    with contextlib.chdir(REPO), pytest.raises(ValueError, match=message):
        run_subcommand(name, ["--config", str(path), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


EXTRA_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if {"compare", "sweep"} & set(yaml.safe_load(p.read_text()) or {}))


def test_there_are_compare_and_sweep_configs():
    assert {"compare_smoke.yaml", "compare_quickstart.yaml", "sweep_smoke.yaml"} <= {p.name for p in EXTRA_CONFIGS}


@pytest.mark.parametrize("path", EXTRA_CONFIGS, ids=lambda p: p.name)
def test_compare_and_sweep_configs_validate(path, monkeypatch, tmp_path):
    # Run from a scratch folder (a logger may create its folder: keep it out of the repo). Benchmark
    # configs read the real task data from ../shared/data, relative to the repository root: give the
    # scratch folder the same neighbour.
    shared = Path(__file__).resolve().parents[2] / "shared"
    if "../shared/" in path.read_text():
        if not (shared / "data").is_dir():
            pytest.skip(f"{path.name} reads ../shared/data, which this checkout does not have beside it")
        (tmp_path / "shared").symlink_to(shared)
        (tmp_path / "repo").mkdir()
        tmp_path = tmp_path / "repo"
    monkeypatch.chdir(tmp_path)
    cli, extras = load_config(path)
    assert extras and cli.model.method is not None
    plans = validate_config(path)
    assert all(plans[name] for name in extras)


def _jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_compare_scores_every_row_on_every_task(tmp_path):
    qa = [{"QUESTION": f"Is drug {i} safe?", "CONTEXTS": ["A short study."], "final_decision": d}
          for i, d in enumerate(["yes", "no", "maybe", "yes"])]
    bills = [{"source": "The bill funds rural hospitals. " * 5, "summary": "Funds hospitals."}] * 2
    calibrated_on, held_out = split_by_document(_texts("domain.txt"), 0.2, 0 + 1)  # as the smoke config's datamodule
    titles = [{"title": f"Title {i}", "abstract": f"Abstract {i} about a trial."} for i in range(5)]
    titles += [{"title": "Seen in calibration", "abstract": calibrated_on[0]}, {"title": "Held out", "abstract": held_out[0]}]
    tasks = [{"name": "pubmedqa", "path": _jsonl(tmp_path / "qa.jsonl", qa), "limit": 3, "calibrate": True},
             {"name": "billsum", "path": _jsonl(tmp_path / "bills.jsonl", bills), "max_new_tokens": 4, "max_length": 96},
             {"name": "pubmed_title", "path": _jsonl(tmp_path / "titles.jsonl", titles), "n": 10, "seed": 0}]
    path = _variant(tmp_path, "compare_smoke.yaml", compare={"methods": ["dense", "magnitude"], "tasks": tasks})
    with contextlib.chdir(REPO):
        run_subcommand("compare", ["--config", str(path), "--output_dir", str(tmp_path / "out")])
    doc = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert [r["method"] for r in doc["rows"]] == ["dense", "magnitude"]
    assert doc["tasks"]["pubmed_title"]["n"] == 6  # the calibration document is left out, the held-out one kept
    for row in doc["rows"]:
        assert "error" not in row and math.isfinite(row["ppl_domain"]), row
        assert set(row["tasks"]) == {"pubmedqa", "billsum", "pubmed_title"}
        for name, metrics in row["tasks"].items():
            assert 0.0 <= row[f"task_{name}"] <= 1.0 and row[f"task_{name}"] == metrics["score"]
            assert metrics["score_ci"][0] <= metrics["score"] <= metrics["score_ci"][1]
        assert row["tasks"]["pubmedqa"]["n"] == 3 and "accuracy_calibrated" in row["tasks"]["pubmedqa"]
        assert "macro_f1" in row["tasks"]["pubmedqa"] and "rouge2" in row["tasks"]["billsum"]
    header, _, *lines = [line for line in (tmp_path / "out" / "comparison.md").read_text().splitlines() if line.startswith("| ")]
    assert header.endswith("| pubmedqa acc_cal | billsum ROUGE-L | pubmed_title acc_per_token |")
    assert all(line.count("|") == header.count("|") and " [" in line.split("|")[-2] for line in lines)


def test_rows_show_lightning_progress_bars_on_a_terminal_only(monkeypatch):
    import io

    from dpruner_lightning.comparison import row_config
    from dpruner_lightning.comparison_rows import method_entry

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    row = method_entry("magnitude")
    for stream, shown in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr("sys.stderr", stream)
        assert row_config({}, row, Path("out"), False)["trainer"]["enable_progress_bar"] is shown
    # A config that says so explicitly wins.
    assert row_config({"trainer": {"enable_progress_bar": False}}, row, Path("out"), False)["trainer"]["enable_progress_bar"] is False
