"""Every equivalent in the README's "Coming from the D-PRUNER README" table, run on a tiny model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpruner_lightning import BenchmarkSuite, DPruner, DPrunerConfig, ExperimentRunner, MaskAnalyzer, PerformanceTracker, load_sample_data

from .conftest import REPO, SMOKE, TINY

TINY_MODEL = dict(model_name="random:llama", tokenizer="bytes", model_overrides=TINY["llama"], device="cpu",
                  max_length=32, calibration_samples=4)
SUITE_OPTIONS = dict(tokenizer="bytes", seq_len=32, num_samples=4, batch_size=2, eval_samples=4, **TINY["llama"])


def _texts(name: str) -> list[str]:
    return [p.strip() for p in (SMOKE / name).read_text().split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def texts():
    general, domain = _texts("general.txt"), _texts("domain.txt")
    return general, domain[:-3], domain[-3:]


def test_load_sample_data_is_importable_from_the_package():
    assert callable(load_sample_data)  # its behaviour: tests/test_api.py::test_load_sample_data_splits_domain_documents


def test_the_quick_start_snippet(tmp_path, texts):
    open_domain_texts, domain_texts, test_texts = texts
    config = DPrunerConfig(sparsity_ratio=0.5, domain="medical", batch_size=2, **TINY_MODEL)
    assert (config.lambda_reg, config.alpha) == (0.1, 3e-4)  # the healthcare preset
    pruner = DPruner(config.model_name, config.device, config.lambda_reg, config.alpha, config=config,
                     output_dir=str(tmp_path / "runs"))
    pruner.step1_compute_general_importance(open_domain_texts, config.batch_size)
    pruner.step2_compute_dual_importance(domain_texts, config.batch_size)
    masks = pruner.step3_prune_model(config.sparsity_ratio)
    perplexity = pruner.evaluate_perplexity(test_texts, config.batch_size)
    assert perplexity > 1.0
    pruner.save_pruned_model(str(tmp_path / "pruned_model"))
    assert (tmp_path / "pruned_model" / "config.json").exists()

    # Mask analysis on those masks and on a second domain's.
    layer_sparsity = MaskAnalyzer.analyze_layer_sparsity(masks)
    assert layer_sparsity["overall"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    legal = DPruner(config=DPrunerConfig(domain="legal", **TINY_MODEL), output_dir=str(tmp_path / "runs"))
    legal.step1_compute_general_importance(open_domain_texts)
    legal.step2_compute_dual_importance(test_texts + domain_texts[:3])
    similarities = MaskAnalyzer.compare_domain_masks(masks, legal.step3_prune_model(0.5))
    assert 0.0 < similarities["overall"]["jaccard_pruned"] < 1.0  # two domains: overlapping, not equal masks
    MaskAnalyzer.visualize_mask_distribution(masks, str(tmp_path / "sparsity_plot.png"))
    assert (tmp_path / "sparsity_plot.png").stat().st_size > 0


def test_the_advanced_configuration_snippet():
    config = DPrunerConfig(model_name="random:llama", sparsity_ratio=0.6, lambda_reg=0.1, alpha=1e-4,
                           use_iterative_blocking=True, block_size=128, batch_size=16, num_epochs=2, max_length=1024,
                           calibration_samples=2000)
    assert config.mask_spec().granularity == "block" and config.method().dual_epochs == 2
    assert config.data_options()["seq_len"] == 1024 and config.data_options()["num_samples"] == 2000


def test_the_benchmark_snippet(tmp_path, texts):
    open_domain_texts, domain_texts, test_texts = texts
    benchmark = BenchmarkSuite("random:llama", output_dir=tmp_path, **SUITE_OPTIONS)
    results = benchmark.compare_pruning_methods(open_domain_texts=open_domain_texts, domain_texts=domain_texts,
                                                test_texts=test_texts, sparsity_ratio=0.5)
    report = benchmark.generate_comparison_report(results)
    assert all(f"| {r['method']} |" in report for r in results) and len(results) == 6


def test_the_performance_tracking_snippet(tmp_path):
    tracker = PerformanceTracker()
    tracker.add_measurement(sparsity=0.3, perplexity=6.2, method="d_pruner")
    tracker.add_measurement(sparsity=0.5, perplexity=7.8, method="d_pruner")
    assert [p["sparsity"] for p in tracker.get_pareto_frontier()] == [0.3, 0.5]
    tracker.export_metrics(str(tmp_path / "performance_data.csv"))
    assert (tmp_path / "performance_data.csv").read_text().count("\n") == 3
    tracker.plot_performance_curves(str(tmp_path / "performance_plot.png"))
    assert (tmp_path / "performance_plot.png").stat().st_size > 0


def test_the_hyperparameter_tuning_snippet(tmp_path, texts):
    open_domain_texts, domain_texts, test_texts = texts
    runner = ExperimentRunner(str(tmp_path))
    sparsity_results = runner.run_sparsity_sweep(model_name="random:llama", open_domain_texts=open_domain_texts,
                                                 domain_texts=domain_texts, test_texts=test_texts,
                                                 sparsity_levels=[0.1, 0.5], domain="medical", **SUITE_OPTIONS)
    hp_results = runner.run_hyperparameter_sweep(model_name="random:llama", open_domain_texts=open_domain_texts,
                                                 domain_texts=domain_texts, test_texts=test_texts, lambda_values=[0.01, 0.1],
                                                 alpha_values=[1e-4], domain="medical", **SUITE_OPTIONS)
    assert [r["method"] for r in sparsity_results] == ["dense", "d_pruner s=0.1", "d_pruner s=0.5"]
    assert len(hp_results) == 3 and all("error" not in r for r in sparsity_results + hp_results)


@pytest.mark.parametrize("args", [
    ["fit", "--config", "configs/healthcare.yaml", "--model.mask.sparsity", "0.5"],
    ["fit", "--config", "configs/quickstart.yaml"],
    ["fit", "--config", "configs/legal.yaml"],
    ["fit", "--config", "configs/finance.yaml"],
], ids=lambda a: " ".join(a[1:3]))
def test_the_command_line_equivalents_parse(args):
    out = subprocess.run([sys.executable, "-m", "dpruner_lightning.cli", *args, "--print_config"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "DPrunerMethod" in out.stdout and "sparsity: 0.5" in out.stdout


def test_compare_takes_the_dotted_overrides_of_fit(tmp_path):
    """`dpruner compare --config ... --model.mask.sparsity 0.3` (the `--compare-baselines --sparsity 0.3`
    equivalent), checked with --dry_run: every row validated, nothing computed."""
    out = subprocess.run([sys.executable, "-m", "dpruner_lightning.cli", "compare", "--config", "configs/compare_smoke.yaml",
                          "--model.mask.sparsity", "0.3", "--data.seq_len=32", "--dry_run", "--output_dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if ": " in line and "mask" in line]
    assert rows and all("'sparsity': 0.3" in line for line in rows)
    assert not list(tmp_path.iterdir())  # a dry run writes nothing
    bad = subprocess.run([sys.executable, "-m", "dpruner_lightning.cli", "compare", "--config", "configs/compare_smoke.yaml",
                          "--modle.mask.sparsity", "0.3", "--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown option --modle.mask.sparsity" in bad.stderr
