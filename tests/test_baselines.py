"""The baselines behind the method interface, each driven by the same Lightning fit as D-PRUNER."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from dpruner_lightning.algorithms.structured import load_structured_pruned
from dpruner_lightning.config import MaskSpec, OutputSpec, TargetSpec
from dpruner_lightning.methods import METHODS, LLMPrunerMethod, SparseGPTMethod, WandaMethod, make_method
from dpruner_lightning.models import load_causal_lm
from dpruner_lightning.module import DPrunerModule

from .helpers import run_prune, smoke_data, tiny_spec


def _zeros(w: torch.Tensor) -> float:
    return float((w == 0).float().mean())


def test_registry_and_make_method():
    assert set(METHODS) == {"d_pruner", "magnitude", "wanda", "sparsegpt", "llm_pruner"}
    assert isinstance(make_method("wanda", source="general"), WandaMethod)
    with pytest.raises(ValueError, match="valid names: d_pruner, magnitude, wanda, sparsegpt, llm_pruner"):
        make_method("wandaa")


def test_wanda_auto_granularity_prunes_each_row_by_half(tmp_path):
    module = run_prune(tmp_path, method=WandaMethod(), validate=False)
    assert module.result.granularity == "row"
    for name, keep in module.result.masks.items():
        assert ((~keep).sum(1) == keep.shape[1] // 2).all(), name


def test_sparsegpt_reaches_the_sparsity_and_updates_kept_weights(tmp_path):
    dense = load_causal_lm(tiny_spec())
    module = run_prune(tmp_path, method=SparseGPTMethod(), validate=False)
    assert module.result.sparsity_realised["targets"] == pytest.approx(0.5, abs=1e-6)
    dense_weights = dict(dense.named_parameters())
    moved = 0
    for name, t in module.targets.items():
        assert _zeros(t.weight_view()) == pytest.approx(0.5, abs=1e-6), name
        keep = module.result.masks[name]
        before = dense_weights[f"{name}.weight"].detach()
        moved += int((t.weight[keep] - before[keep]).abs().gt(1e-6).sum())  # OBS reconstruction
    assert moved > 0


def test_sparsegpt_two_four_pattern_is_exact(tmp_path):
    module = run_prune(tmp_path, method=SparseGPTMethod(), mask=MaskSpec(granularity="2:4"), validate=False)
    for name, t in module.targets.items():
        zero = (t.weight_view() == 0).reshape(t.shape[0], -1, 4)
        assert (zero.sum(-1) == 2).all(), name


@pytest.mark.parametrize("mask", [MaskSpec(granularity="row"), MaskSpec(granularity="global"), MaskSpec(allocation="owl")])
def test_sparsegpt_rejects_masks_it_cannot_honour_when_built(mask):
    with pytest.raises(ValueError, match="SparseGPT"):
        DPrunerModule(model=tiny_spec(), method=SparseGPTMethod(), mask=mask)


def test_llm_pruner_rejects_patterns_and_partial_targets():
    with pytest.raises(ValueError, match="LLM-Pruner"):
        DPrunerModule(model=tiny_spec(), method=LLMPrunerMethod(), mask=MaskSpec(granularity="2:4"))
    module = DPrunerModule(model=tiny_spec(), method=LLMPrunerMethod(), targets=TargetSpec(target_modules=r".*\.mlp\..*"))
    with pytest.raises(ValueError, match="targets must be exactly"):
        module.configure_model()


def test_llm_pruner_shrinks_the_model_and_the_export_reloads(tmp_path):
    module = DPrunerModule(model=tiny_spec(), method=LLMPrunerMethod(), mask=MaskSpec(sparsity=0.4),
                           output=OutputSpec(save_importance=False))
    trainer = L.Trainer(**module.trainer_kwargs(), accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, smoke_data())
    summary, model = module.run_summary(), module.model
    assert model.model.layers[0].mlp.up_proj.out_features < 128
    assert summary["parameters"]["all"] < summary["parameters"]["all_dense"]
    assert summary["granularity"] == "structured" and not module.result.masks
    # One MLP channel is the finest unit: realised is the request up to one group's worth of weights.
    per_block = summary["parameters"]["targets_dense"] / 2
    attn_group = 2 * 16 * 64 + 2 * 16 * 64 + 2 * 32 * 64  # q + k + v + o weights of one KV group
    assert abs(summary["sparsity_realised"]["targets"] - 0.4) <= attn_group / per_block
    folder = tmp_path / "pruned_model"
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        from transformers import AutoModelForCausalLM

        for reloaded in (AutoModelForCausalLM.from_pretrained(folder), load_structured_pruned(str(folder))):
            torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_the_same_fit(tmp_path, family, name):
    module = run_prune(tmp_path, family, method=make_method(name), validate=True)
    assert module.pruned and module.stage == "pruned"
    realised = module.result.sparsity_realised["targets"]
    # Structured: whole heads/channels (one GPT-2 head = 4.2% of the targets), else exact.
    assert realised == pytest.approx(0.5, abs=0.05 if name == "llm_pruner" else 1e-3)
    ppl = module.perplexities["pruned"]
    assert set(ppl) == {"domain", "general"} and all(math.isfinite(v) and v > 1 for v in ppl.values())
