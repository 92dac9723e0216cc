"""The brief's Python API: presets, aliases, sample data, and the step-by-step DPruner on a tiny model."""

from __future__ import annotations

import pytest
import torch

from dpruner_lightning import DPruner, DPrunerConfig, load_sample_data
from dpruner_lightning.api import canonical_domain

from .conftest import SMOKE, TINY


@pytest.mark.parametrize("alias,domain,lam,alpha", [
    ("medical", "healthcare", 0.1, 3e-4), ("healthcare", "healthcare", 0.1, 3e-4),
    ("law", "legal", 0.001, 3e-4), ("finance", "finance", 0.05, 2e-4), ("custom", "custom", 0.05, 2e-4),
])
def test_for_domain_presets(alias, domain, lam, alpha):
    cfg = DPrunerConfig.for_domain(alias, sparsity_ratio=0.3)
    assert (cfg.domain, cfg.lambda_reg, cfg.alpha, cfg.sparsity_ratio) == (domain, lam, alpha, 0.3)


def test_bad_config_values_fail_at_construction():
    with pytest.raises(ValueError, match="unknown domain 'astrology'"):
        canonical_domain("astrology")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        DPrunerConfig(sparsity_ratio=1.2)
    assert DPrunerConfig(use_iterative_blocking=True, block_size=64).mask_spec().granularity == "block"
    # The domain's preset applies unless a value is given explicitly.
    legal = DPrunerConfig(domain="law")
    assert (legal.domain, legal.lambda_reg, legal.alpha) == ("legal", 0.001, 3e-4)
    assert DPrunerConfig(domain="finance", alpha=1e-3).lambda_reg == 0.05
    assert DPrunerConfig(domain="finance", alpha=1e-3).alpha == 1e-3
    assert DPrunerConfig.for_domain("legal") == legal


def test_load_sample_data_splits_domain_documents(monkeypatch):
    corpora = {"wikipedia": [f"wiki {i}" for i in range(10)], "pubmed": [f"abstract {i}" for i in range(20)]}
    monkeypatch.setattr("dpruner_lightning.assets.sample_corpus", lambda name: corpora[name])
    general, domain, test = load_sample_data("medical", test_fraction=0.25, seed=1)
    assert general == corpora["wikipedia"]
    assert len(test) == 5 and len(domain) == 15 and not set(test) & set(domain)
    assert load_sample_data("medical", test_fraction=0.25, seed=1)[2] == test
    with pytest.raises(ValueError, match="no offline sample corpus for domain 'finance'"):
        load_sample_data("finance")


def test_step_by_step_api_on_tiny_model(tmp_path):
    paragraphs = lambda name: (SMOKE / name).read_text().split("\n\n")  # noqa: E731
    cfg = DPrunerConfig.for_domain("medical", model_name="random:llama", tokenizer="bytes",
                                   model_overrides=TINY["llama"], max_length=32, calibration_samples=4, batch_size=2)
    pruner = DPruner(cfg.model_name, "cpu", cfg.lambda_reg, cfg.alpha, config=cfg, output_dir=str(tmp_path / "runs"))
    with pytest.raises(RuntimeError, match="run step1"):
        pruner.step2_compute_dual_importance(paragraphs("domain.txt"))
    general = pruner.step1_compute_general_importance(paragraphs("general.txt")[:8])
    loaded = {n: t.weight.detach().clone() for n, t in pruner.module.targets.items()}  # a backward pass changes no weight
    mean = sum(float(g.sum()) for g in general.values()) / sum(g.numel() for g in general.values())
    assert mean == pytest.approx(1.0, rel=1e-5)
    dual = pruner.step2_compute_dual_importance(paragraphs("domain.txt")[:8])
    assert all(float(s.sum()) > 0 for s in dual.values())
    dense_ppl = pruner.evaluate_perplexity(paragraphs("domain.txt")[8:])
    from dpruner_lightning.evaluation import pubmedqa

    records = [{"question": "Is aspirin an anticoagulant?", "context": {"contexts": ["Aspirin inhibits platelets."]},
                "final_decision": "no"}, {"question": "Does sepsis need antibiotics?", "context": "Guidelines say so.",
                                          "final_decision": "yes"}]
    task_result = pruner.evaluate_task(pubmedqa(records))
    assert task_result["n"] == 2 and 0.0 <= task_result["accuracy"] <= 1.0
    masks = pruner.step3_prune_model(0.5)
    pruned_ppl = pruner.evaluate_perplexity(paragraphs("domain.txt")[8:])
    assert dense_ppl > 1 and pruned_ppl > 1 and dense_ppl != pruned_ppl
    assert all(abs(float((~m).float().mean()) - 0.5) < 1e-3 for m in masks.values())
    folder = pruner.save_pruned_model(str(tmp_path / "pruned"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    w = reloaded.model.layers[0].mlp.up_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert torch.equal(w, pruner.model.model.layers[0].mlp.up_proj.weight)
    # Pruning again at another sparsity starts from the unpruned weights (it failed on cached masks before),
    # and going back to 0.5 gives exactly the first result.
    first = {n: m.clone() for n, m in masks.items()}
    weights = {n: t.weight.detach().clone() for n, t in pruner.module.targets.items()}
    more = pruner.step3_prune_model(0.7)
    assert all(abs(float((~m).float().mean()) - 0.7) < 1e-3 for m in more.values())
    assert all(bool((first[n] | ~more[n]).all()) for n in more)  # the 0.7 masks keep a subset of the 0.5 ones
    again = pruner.step3_prune_model(0.5)
    assert all(torch.equal(again[n], first[n]) for n in first)
    assert all(torch.equal(t.weight, weights[n]) for n, t in pruner.module.targets.items())
    # A pass after step 3 starts from the weights as loaded, not the pruned (nor the fine-tuned) ones.
    pruner.step1_compute_general_importance(paragraphs("general.txt")[:8])
    assert not pruner.module.pruned
    assert all(torch.equal(t.weight, loaded[n]) for n, t in pruner.module.targets.items())


def test_dpruner_takes_what_is_not_given_from_the_config(tmp_path):
    cfg = DPrunerConfig.for_domain("legal", model_name="random:llama", tokenizer="bytes", model_overrides=TINY["llama"])
    pruner = DPruner(config=cfg, output_dir=str(tmp_path))
    assert (pruner.config.model_name, pruner.config.lambda_reg) == ("random:llama", 0.001)
    pruner = DPruner("random:llama", "cpu", 0.5, config=cfg, output_dir=str(tmp_path))
    assert (pruner.config.device, pruner.config.lambda_reg, pruner.config.alpha) == ("cpu", 0.5, 3e-4)
    assert pruner.module.method.lambda_reg == 0.5
