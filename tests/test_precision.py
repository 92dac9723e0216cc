"""The dual pass in 16-bit weights (fp32 master copies), the clip-then-proximal order, and the loss
scale of 16-mixed kept out of the scores."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import Precision

from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.config import MaskSpec, OutputSpec
from dpruner_lightning.methods import DPrunerMethod
from dpruner_lightning.module import DPrunerModule
from dpruner_lightning.pruning import calibrate

from .conftest import tiny_model
from .helpers import smoke_data, tiny_spec, token_batches


def _batches(seed: int, n: int = 4) -> list[torch.Tensor]:
    return token_batches(seed, n)


def _dual(model, **kw) -> tuple[DPrunerMethod, dict, dict]:
    targets = find_targets(model)
    w0 = {n: t.weight_view().detach().float().clone() for n, t in targets.items()}
    method = DPrunerMethod(**kw)
    method.prepare(model, targets)
    calibrate(model, targets, method, {"general": _batches(0), "domain": _batches(1)})
    return method, targets, w0


def test_bf16_dual_pass_moves_the_weights_as_the_fp32_one_does():
    kw = dict(alpha=3e-4, lambda_reg=0.1)
    fp32, targets32, w0 = _dual(tiny_model("llama"), **kw)
    bf16, targets16, _ = _dual(tiny_model("llama").to(torch.bfloat16), **kw)
    for name, t in targets16.items():
        want = targets32[name].weight_view().float() - w0[name]
        got = bf16.master[name] - w0[name].to(torch.bfloat16).float()
        # bf16 forwards change the gradients by about bf16's precision, not by whole steps.
        assert float((got - want).norm() / want.norm()) < 0.05, name
        # The weights the model runs with are the masters rounded, nothing else.
        assert torch.equal(t.weight_view(), bf16.master[name].to(torch.bfloat16))
    moved = sum(int((bf16.master[n] != w0[n].to(torch.bfloat16).float()).sum()) for n in targets16)
    assert moved > 0.9 * sum(w.numel() for w in w0.values())  # stepping bf16 directly left ~99% unmoved


def test_max_grad_norm_clips_the_task_gradient_before_the_proximal_step():
    model = tiny_model("llama")
    targets = find_targets(model)
    lam, alpha, max_norm = 0.5, 0.05, 1e-3
    method = DPrunerMethod(alpha=alpha, lambda_reg=lam, max_grad_norm=max_norm)
    method.prepare(model, targets)
    batch = _batches(1, 1)
    calibrate(model, targets, method, {"general": _batches(0), "domain": []})  # G only
    w0 = {n: t.weight_view().detach().clone() for n, t in targets.items()}
    reference = copy.deepcopy(model)
    calibrate(model, targets, method, {"general": [], "domain": batch}, passes=[method.passes()[1]])
    # Closed form: W' = (W - alpha * c * g + 2 alpha lambda G W0) / (1 + 2 alpha lambda G), c = min(1, max / |g|).
    ref_targets = find_targets(reference)
    for t in ref_targets.values():
        t.weight.requires_grad_(True)
    reference(input_ids=batch[0], labels=batch[0]).loss.backward()
    grads = {n: t.weight_view(t.weight.grad) for n, t in ref_targets.items()}
    c = min(1.0, max_norm / float(torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))))
    assert c < 0.1  # the clip is active
    for name, t in targets.items():
        G, W = method.general[name], w0[name]
        expected = (W - alpha * c * grads[name] + 2 * alpha * lam * G * W) / (1 + 2 * alpha * lam * G)
        torch.testing.assert_close(t.weight_view(), expected, rtol=1e-5, atol=1e-7)


class _ScaledLoss(Precision):
    """A stand-in for 16-mixed's loss scaler on CPU: the loss is multiplied by ``scale`` before backward."""

    class _Scaler:
        def __init__(self, scale: float) -> None:
            self.scale = scale

        def is_enabled(self) -> bool:
            return True

        def get_scale(self) -> float:
            return self.scale

        def get_backoff_factor(self) -> float:
            return 0.5

        def update(self, new_scale: float) -> None:
            self.scale = new_scale

    def __init__(self, scale: float) -> None:
        self.scaler = self._Scaler(scale)

    def pre_backward(self, tensor, module):
        return super().pre_backward(tensor * self.scaler.scale, module)


@pytest.mark.parametrize("scale", [1.0, 1024.0])
def test_a_loss_scale_never_reaches_the_scores(tmp_path, scale):
    def run(precision_plugin):
        module = DPrunerModule(model=tiny_spec(), method=DPrunerMethod(alpha=1e-3), mask=MaskSpec(sparsity=0.5),
                               output=OutputSpec(export_model=False, save_importance=False, save_masks=False))
        trainer = L.Trainer(**module.trainer_kwargs(), accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=str(tmp_path), plugins=[precision_plugin] if precision_plugin else None)
        trainer.fit(module, smoke_data())
        return module.method

    plain, scaled = run(None), run(_ScaledLoss(scale))
    for name in plain.dual:
        torch.testing.assert_close(scaled.general[name], plain.general[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(scaled.dual[name], plain.dual[name], rtol=1e-4, atol=1e-6)


def test_memory_estimate_counts_what_the_passes_hold_and_refuses_a_run_that_cannot_fit(tmp_path, monkeypatch):
    from dpruner_lightning.config import TargetSpec
    from dpruner_lightning.estimate import estimate_memory

    spec = tiny_spec()
    est32 = estimate_memory(spec, DPrunerMethod(), TargetSpec(), batch_size=2, seq_len=32)
    model = tiny_model("llama")
    targets = find_targets(model)
    n_targets = sum(t.numel() for t in targets.values())
    assert est32.weights == sum(p.numel() for p in model.parameters()) * 4
    assert est32.gradients == n_targets * 4
    scratch = 3 * max(t.numel() for t in targets.values()) * 4  # the dual step's three reused fp32 buffers
    assert est32.method_state == n_targets * (4 + 4 + 4) + scratch  # dual pass: G, S, W0 (fp32: no master copy)
    bf16 = estimate_memory(tiny_spec(dtype="bfloat16"), DPrunerMethod(), TargetSpec(), batch_size=2, seq_len=32)
    assert bf16.method_state == n_targets * (4 + 4 + 2 + 4) + scratch  # + the fp32 masters
    ckpt = estimate_memory(tiny_spec(gradient_checkpointing=True), DPrunerMethod(), TargetSpec(), 2, 32)
    assert ckpt.activations < est32.activations
    eager = estimate_memory(tiny_spec(attn_implementation="eager"), DPrunerMethod(), TargetSpec(), 2, 32)
    assert eager.activations > est32.activations  # eager attention keeps the s x s scores; SDPA does not

    monkeypatch.setattr("dpruner_lightning.estimate.available_bytes", lambda device: est32.total // 2)
    calls = []
    monkeypatch.setattr(DPrunerMethod, "start_pass", lambda self, p: calls.append(p))
    module = DPrunerModule(model=tiny_spec(), output=OutputSpec(export_model=False))
    trainer = L.Trainer(**module.trainer_kwargs(), accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"will not fit on cpu: estimated peak .*MiB.*gradient_checkpointing true"):
        trainer.fit(module, smoke_data())
    assert calls == [] and module.model is None  # refused before loading the model or running a pass


def test_gradient_checkpointing_gives_the_same_scores(tmp_path):
    def scores(checkpointing: bool):
        module = DPrunerModule(model=tiny_spec(gradient_checkpointing=checkpointing), method=DPrunerMethod(alpha=1e-3),
                               output=OutputSpec(export_model=False, save_importance=False, save_masks=False))
        trainer = L.Trainer(**module.trainer_kwargs(), accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=str(tmp_path))
        trainer.fit(module, smoke_data())
        assert module.model.is_gradient_checkpointing == checkpointing
        return module.method

    plain, ckpt = scores(False), scores(True)
    for name in plain.dual:
        torch.testing.assert_close(ckpt.general[name], plain.general[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ckpt.dual[name], plain.dual[name], rtol=1e-5, atol=1e-7)
