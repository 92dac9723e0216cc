"""End to end: `dpruner fit --config configs/smoke.yaml` and everything it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import REPO


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smoke")
    cmd = [sys.executable, "-m", "dpruner_lightning.cli", "fit", "--config", str(REPO / "configs" / "smoke.yaml"),
           "--trainer.logger.init_args.save_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = sorted(out.glob("smoke/version_*"))
    assert len(runs) == 1
    return runs[0]


def test_smoke_run_writes_every_artifact(smoke_run):
    for name in ("config.yaml", "summary.json", "general_importance.safetensors", "dual_importance.safetensors",
                 "masks.safetensors", "pruned_model/config.json"):
        assert (smoke_run / name).exists(), name
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["method"] == "d_pruner"
    assert summary["sparsity_target"] == 0.5
    assert abs(summary["sparsity_realised"]["targets"] - 0.5) < 1e-3
    assert 0.2 < summary["sparsity_realised"]["all_parameters"] < 0.5  # embeddings/norms stay dense
    for stage in ("dense", "pruned"):
        for name in ("domain", "general"):
            assert summary["perplexity"][stage][name] > 1.0
    assert set(summary["seconds"]) >= {"general", "dual", "mask"}
    assert summary["peak_memory_bytes"] > 0


def test_pruned_folder_reloads_with_requested_sparsity(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpruner_lightning.algorithms.targets import find_targets
    from dpruner_lightning.export import load_tensors

    model = AutoModelForCausalLM.from_pretrained(smoke_run / "pruned_model")
    AutoTokenizer.from_pretrained(smoke_run / "pruned_model")
    targets = find_targets(model)
    masks = load_tensors(smoke_run / "masks.safetensors")
    assert set(masks) == set(targets)
    for name, t in targets.items():
        w = t.weight_view()
        assert abs(float((w == 0).float().mean()) - 0.5) < 1e-3, name
        assert torch.all(w[masks[name] == 0] == 0)
    from dpruner_lightning.export import load_sparse_model

    sparse = load_sparse_model(smoke_run / "sparse_model")
    for a, b in zip(model.state_dict().values(), sparse.state_dict().values()):
        assert torch.equal(a, b)
    importance = load_tensors(smoke_run / "general_importance.safetensors")
    mean = sum(float(v.sum()) for v in importance.values()) / sum(v.numel() for v in importance.values())
    assert abs(mean - 1.0) < 1e-4  # G is normalised to mean 1


def test_tensorboard_has_histograms_and_perplexities(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    histos, scalars = set(), set()
    for event_file in smoke_run.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file), size_guidance={"histograms": 0, "scalars": 0})
        acc.Reload()
        histos |= set(acc.Tags()["histograms"])
        scalars |= set(acc.Tags()["scalars"])
    assert any(t.startswith("general_importance/") and t.endswith("q_proj") for t in histos)
    assert any(t.startswith("dual_importance/") for t in histos)
    assert {"ppl/domain_dense", "ppl/general_dense", "ppl/domain_pruned", "ppl/general_pruned"} <= scalars
    assert "sparsity/targets" in scalars and "dual/reg_grad_norm" in scalars


def test_print_config_lists_the_method():
    proc = subprocess.run([sys.executable, "-m", "dpruner_lightning.cli", "fit", "--config", "configs/smoke.yaml",
                           "--print_config"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dpruner_lightning.methods.DPrunerMethod" in proc.stdout and "lambda_reg: 0.1" in proc.stdout


def _dpruner(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpruner_lightning.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_help_lists_exactly_the_working_commands():
    out = _dpruner("--help")
    assert out.returncode == 0
    listed = [line.split()[0] for line in out.stdout.split("commands:")[1].strip().splitlines()[:6]]
    assert listed == ["fit", "validate", "compare", "sweep", "speed", "eval"]
    assert out.stdout.split("commands:")[1].strip().splitlines()[6] == ""  # nothing else listed
    sub = _dpruner("eval", "--help")  # its own help names both kinds of task
    assert sub.returncode == 0 and "lm_eval:<task>" in sub.stdout and "--lm-eval-include" in sub.stdout and "pubmed_title" in sub.stdout
    for gone in ("test", "predict"):  # a pruning module has no test / predict step: refused, not crashed
        proc = _dpruner(gone, "--config", "configs/smoke.yaml")
        assert proc.returncode == 2 and f"unknown command {gone!r}" in proc.stderr and "Traceback" not in proc.stderr


def test_print_config_has_no_optimizer_keys():
    out = _dpruner("fit", "--config", "configs/smoke.yaml", "--print_config")
    assert out.returncode == 0 and "model:" in out.stdout
    assert "optimizer" not in out.stdout and "lr_scheduler" not in out.stdout


def test_tensorboard_gets_the_mask_figure_the_summary_text_and_a_real_hp_metric(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(smoke_run), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    # The smoke run is D-PRUNER: the masks' sparsity, the share of S they keep, and G against S.
    for tag in ("masks/sparsity_by_block_and_kind", "importance/kept_by_block_and_kind", "importance/general_vs_dual"):
        assert tag in tags["images"], tag
        image = acc.Images(tag)[0]
        assert image.width > 200 and image.height > 100, tag
    assert 0.5 < acc.Scalars("importance/kept_share")[-1].value < 1.0  # the kept half holds most of S
    assert "run/summary/text_summary" in tags["tensors"]
    text = acc.Tensors("run/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "DPrunerMethod(" in text and "sparsity requested | 0.5000" in text
    summary = json.loads((smoke_run / "summary.json").read_text())
    hp = [e.value for e in acc.Scalars("hp_metric")]
    assert hp[-1] == pytest.approx(summary["perplexity"]["pruned"]["domain"], rel=1e-5) and hp[-1] != -1


def test_validate_on_a_pruned_folder_does_not_call_it_dense(smoke_run, tmp_path):
    out = subprocess.run([sys.executable, "-m", "dpruner_lightning.cli", "validate", "--config",
                          str(REPO / "configs" / "smoke.yaml"), "--model.model.name_or_path", str(smoke_run / "pruned_model"),
                          "--model.model.tokenizer", "null", "--model.model.config_overrides", "{}",
                          "--trainer.logger.init_args.save_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = tmp_path.glob("smoke/version_*")
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["perplexity"]) == {"loaded"} and summary["status"] == "complete"
    fit = json.loads((smoke_run / "summary.json").read_text())  # the same weights, the same evaluation text
    assert summary["perplexity"]["loaded"]["domain"] == pytest.approx(fit["perplexity"]["pruned"]["domain"], rel=1e-4)
