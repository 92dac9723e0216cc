"""``kernels: compiled``: D-PRUNER's per-step arithmetic as fused ``torch.compile`` kernels gives the
eager path's scores and weights (up to fp32 rounding), and a platform that cannot compile says so
before the first micro-batch."""

from __future__ import annotations

import copy

import pytest
import torch

from dpruner_lightning.algorithms import fused
from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.methods import DPrunerMethod
from dpruner_lightning.pruning import calibrate

from .conftest import tiny_model
from .helpers import fused_kernels_compile, token_batches

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _run(model, **kw):
    method = DPrunerMethod(**kw)
    targets = find_targets(model)
    method.prepare(model, targets)
    device = next(model.parameters()).device
    batches = {source: [b.to(device) for b in token_batches(seed, 3)] for seed, source in enumerate(("general", "domain"))}
    calibrate(model, targets, method, batches)
    return method, targets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,kw", [
    (torch.bfloat16, dict(alpha=1e-2, lambda_reg=5.0, max_grad_norm=0.05)),  # fp32 masters, proximal, clipped
    (torch.float32, dict(alpha=1e-2, lambda_reg=5.0, update="sgd")),  # the weights themselves, plain SGD
], ids=["bf16-proximal-clip", "fp32-sgd"])
def test_compiled_kernels_match_the_eager_arithmetic(dtype, kw, device):
    if not fused_kernels_compile(device):
        pytest.skip(f"torch.compile cannot build kernels on {device} here (no C++ compiler / Triton)")
    base = tiny_model("llama").to(dtype).to(device)
    eager, t_eager = _run(copy.deepcopy(base), kernels="eager", **kw)
    compiled, t_compiled = _run(copy.deepcopy(base), kernels="compiled", **kw)
    assert compiled._fused and not eager._fused  # the compiled run really took the fused path
    assert not DPrunerMethod()._fused  # and auto stays eager until a pass on CUDA decides otherwise
    moved = 0.0
    for name, t in t_eager.items():
        # G: the first gradient is written the same way, the rest summed in another order of operations
        torch.testing.assert_close(compiled.general[name], eager.general[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled.dual[name], eager.dual[name], rtol=1e-4, atol=1e-7)
        drift_eager = t.weight.float() - eager.original[name].float()
        drift_compiled = t_compiled[name].weight.float() - compiled.original[name].float()
        # the steps agree to fp32 rounding; a 16-bit weight may round to the neighbouring value
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(drift_compiled, drift_eager, rtol=0, atol=ulp * float(t.weight.abs().max()))
        if name in eager.master:
            torch.testing.assert_close(compiled.master[name], eager.master[name], rtol=1e-6, atol=1e-8)
        moved = max(moved, float(drift_eager.abs().max()))
        assert t_compiled[name].weight.grad is None  # freed once applied
    assert moved > 0  # the dual pass did change the weights


def test_compiled_kernels_need_the_state_beside_the_weights():
    with pytest.raises(ValueError, match="kernels must be 'auto', 'eager' or 'compiled'"):
        DPrunerMethod(kernels="triton")
    model = tiny_model("llama").to("meta")  # weights off the host, state in host memory
    with pytest.raises(ValueError, match="kernels: compiled runs each update where the weights are.*kernels: eager"):
        DPrunerMethod(kernels="compiled", state_device="cpu").prepare(model, find_targets(model))


def test_a_platform_that_cannot_compile_fails_before_the_first_batch(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(fused, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    model = tiny_model("llama")
    method = DPrunerMethod(kernels="compiled")
    method.prepare(model, find_targets(model))
    with pytest.raises(RuntimeError, match="kernels: compiled needs torch.compile to work on cpu .*no C\\+\\+ compiler"
                                           ".*set kernels: eager"):
        calibrate(model, method.targets, method, {"general": token_batches(0, 1), "domain": token_batches(1, 1)})
    assert method._taylor and all(s.count == 0 for s in method._taylor.values())  # no batch was computed
