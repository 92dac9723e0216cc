"""The Lightning layer on tiny models: families, determinism, granularities, perplexity."""

from __future__ import annotations

import math

import pytest
import torch

from dpruner_lightning.config import MaskSpec
from dpruner_lightning.methods import DPrunerMethod

from .helpers import mask_hash, run_prune


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
@pytest.mark.parametrize("estimator", ["taylor", "obs"])
def test_every_family_prunes(tmp_path, family, estimator):
    module = run_prune(tmp_path, family, method=DPrunerMethod(general_estimator=estimator), validate=False)
    assert module.pruned and len(module.result.masks) >= 4
    for name, t in module.targets.items():
        assert abs(float((t.weight_view() == 0).float().mean()) - 0.5) < 1e-3, name
    assert module.result.sparsity_realised["targets"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("family", ["bloom", "qwen2", "mistral"])
def test_more_families_prune(tmp_path, family):
    module = run_prune(tmp_path, family, validate=False)
    assert module.result.sparsity_realised["targets"] == pytest.approx(0.5, abs=1e-3)
    assert len(module.targets) >= 4


def test_same_seed_same_mask_other_data_seed_other_mask(tmp_path):
    a = run_prune(tmp_path / "a", seed=0, validate=False)
    b = run_prune(tmp_path / "b", seed=0, validate=False)
    c = run_prune(tmp_path / "c", seed=1, validate=False)
    assert mask_hash(a.result.masks) == mask_hash(b.result.masks)
    assert mask_hash(a.result.masks) != mask_hash(c.result.masks)


@pytest.mark.parametrize("granularity", ["row", "block", "2:4", "global"])
def test_granularities_through_the_module(tmp_path, granularity):
    module = run_prune(tmp_path, mask=MaskSpec(sparsity=0.5, granularity=granularity, block_size=16), validate=False)
    for name, keep in module.result.masks.items():
        if granularity == "2:4":
            assert ((~keep).reshape(keep.shape[0], -1, 4).sum(-1) == 2).all(), name
        elif granularity == "row":
            assert ((~keep).sum(1) == keep.shape[1] // 2).all(), name
    assert module.result.sparsity_realised["targets"] == pytest.approx(0.5, abs=1e-3)


def test_owl_allocation_keeps_overall_sparsity(tmp_path):
    module = run_prune(tmp_path, mask=MaskSpec(sparsity=0.5, allocation="owl", owl_lambda=0.1), validate=False)
    assert module.result.sparsity_realised["targets"] == pytest.approx(0.5, abs=0.01)


def test_validate_reports_exact_token_weighted_perplexity(tmp_path):
    module = run_prune(tmp_path, validate=True)
    data = module.trainer.datamodule
    # Recompute the pruned perplexity naively over the same evaluation blocks.
    for name in ("domain", "general"):
        blocks = data.evaluation[name]
        with torch.no_grad():
            logits = module.model(input_ids=blocks).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))
        assert module.perplexities["pruned"][name] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert set(module.perplexities) >= {"dense", "pruned"}


def test_bf16_true_keeps_rotary_inv_freq_in_fp32(tmp_path):
    import lightning as L

    from dpruner_lightning.config import OutputSpec
    from dpruner_lightning.module import DPrunerModule

    from .helpers import smoke_data, tiny_spec

    module = DPrunerModule(model=tiny_spec(), output=OutputSpec(export_model=False))
    trainer = L.Trainer(accelerator="cpu", precision="bf16-true", **module.trainer_kwargs(), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, smoke_data())
    buffers = {n: b for n, b in module.model.named_buffers() if "inv_freq" in n}
    assert buffers and all(b.dtype == torch.float32 for b in buffers.values())
    assert next(module.model.parameters()).dtype == torch.bfloat16
    assert module.result.sparsity_realised["targets"] == pytest.approx(0.5, abs=1e-3)


def test_step_statistics_are_computed_only_on_the_steps_the_logger_writes(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dpruner_lightning.config import OutputSpec
    from dpruner_lightning.module import DPrunerModule

    from .helpers import smoke_data, tiny_spec

    method, computed = DPrunerMethod(alpha=1e-3), []
    inner = method._dual_gradients

    def spy():
        stats = inner()
        computed.append(bool(stats))
        return stats

    method._dual_gradients = spy
    module = DPrunerModule(model=tiny_spec(), method=method, mask=MaskSpec(sparsity=0.5),
                           output=OutputSpec(export_model=False, save_importance=False, save_masks=False))
    trainer = L.Trainer(**module.trainer_kwargs(), accelerator="cpu", logger=TensorBoardLogger(str(tmp_path), name="tb"),
                        log_every_n_steps=2, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, smoke_data(num_samples=8))
    written = []
    for event_file in tmp_path.glob("tb/*/events.out.tfevents.*"):
        acc = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        acc.Reload()
        if "dual/reg_grad_norm" in acc.Tags()["scalars"]:
            written += [e.step for e in acc.Scalars("dual/reg_grad_norm")]
    assert 0 < sum(computed) < len(computed)  # some steps, not all
    assert sum(computed) == len(written)  # exactly the steps the logger wrote
