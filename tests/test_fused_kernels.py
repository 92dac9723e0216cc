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


@pytest.mark.parametrize("kernels", ["eager", "compiled"])
def test_g_in_the_weights_dtype_saves_memory_and_barely_moves_s(kernels):
    """``general_dtype: weights`` keeps G in bf16 during the dual pass: 2 bytes less per target weight in the
    estimate, and S within bf16 rounding of G of the fp32 run (the proximal denominator stays fp32)."""
    from dpruner_lightning.algorithms.masks import select_mask
    from dpruner_lightning.config import TargetSpec
    from dpruner_lightning.estimate import estimate_memory

    from .helpers import tiny_spec

    if kernels == "compiled" and not fused_kernels_compile("cpu"):
        pytest.skip("torch.compile cannot build kernels on cpu here (no C++ compiler)")
    base = tiny_model("llama").to(torch.bfloat16)
    kw = dict(alpha=1e-2, lambda_reg=5.0, kernels=kernels)  # a strong regulariser, so G matters to S
    full, _ = _run(copy.deepcopy(base), **kw)
    compact, _ = _run(copy.deepcopy(base), general_dtype="weights", **kw)
    assert all(g.dtype == torch.bfloat16 for g in compact.general.values())
    assert all(g.dtype == torch.float32 for g in full.general.values())
    for name, s in full.dual.items():
        torch.testing.assert_close(compact.general[name].float(), full.general[name], rtol=2 ** -8, atol=0)
        # a rounded G moves the fp32 masters by rounding, which can flip a bf16 weight by one ulp and so
        # change later gradients a little: S agrees in norm (measured 0.4%) and in the masks (>= 99.7%)
        assert float((compact.dual[name] - s).norm() / s.norm()) < 0.02, name
        keep = (select_mask(compact.dual[name], 0.5), select_mask(s, 0.5))
        assert float((keep[0] == keep[1]).float().mean()) >= 0.99, name
    spec, shapes = tiny_spec(dtype="bfloat16"), {n: t.shape for n, t in find_targets(base).items()}
    saved = (estimate_memory(spec, DPrunerMethod(), TargetSpec(), 2, 32).method_state
             - estimate_memory(spec, DPrunerMethod(general_dtype="weights"), TargetSpec(), 2, 32).method_state)
    assert saved == 2 * sum(r * c for r, c in shapes.values())
    groups = {"general_importance": compact.general, "dual_importance": compact.dual}  # what a run saves
    assert DPrunerMethod(general_dtype="weights", alpha=1e-2, lambda_reg=5.0).load_artifacts(groups, repr(compact)) \
        == ["general", "dual"]
    assert DPrunerMethod(alpha=1e-2, lambda_reg=5.0).load_artifacts(groups, repr(compact)) == []  # rounded G: not reused
    with pytest.raises(ValueError, match="general_dtype must be 'float32' or 'weights'"):
        DPrunerMethod(general_dtype="bfloat16")


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_kernels_run_from_another_thread_without_recompiling(device):
    """On an accelerator, autograd runs the post-accumulate-grad hooks (and so the fused dual step) on its
    own device thread, not on the thread that compiled the kernels: a second thread gets the same
    results from the same compiled kernel."""
    import threading

    from torch._dynamo.utils import counters

    if not fused_kernels_compile(device):
        pytest.skip(f"torch.compile cannot build kernels on {device} here (no C++ compiler / Triton)")
    fused.warm_up(torch.device(device), torch.bfloat16, dual=True, master=True, proximal=True)
    gen = torch.Generator().manual_seed(0)

    def operands():
        weight = torch.randn(96, 80, generator=gen).to(torch.bfloat16)
        return [t.to(device) for t in (torch.randn(96, 80, generator=gen).to(torch.bfloat16), torch.rand(96, 80, generator=gen),
                                       torch.zeros(96, 80), weight.clone(), weight, weight.float())]

    scalars = fused.dual_scalars(1.0, 1.0, 1e-2, 2e-2, torch.device(device))
    here = operands()
    there = [t.clone() for t in here]
    start = here[5].clone()
    graphs = counters["stats"]["unique_graphs"]
    fused.dual_step_(*here, scalars, True, False)
    errors: list[BaseException] = []

    def step() -> None:
        try:
            fused.dual_step_(*there, scalars, True, False)
        except BaseException as err:  # surfaces in the main thread below
            errors.append(err)

    worker = threading.Thread(target=step)
    worker.start()
    worker.join()
    assert not errors, errors
    assert counters["stats"]["unique_graphs"] == graphs  # the warm-up's kernel served both threads
    for a, b in zip(here, there):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(here[2].abs().sum()) > 0 and not torch.equal(here[5], start)  # S and the master moved
