"""``state_device``: the methods' accumulators, W0 and fp32 masters in host memory give the same results
as on the weights' device; gradients are freed once used; the estimate counts host state apart."""

from __future__ import annotations

import copy

import pytest
import torch

from dpruner_lightning.algorithms.importance import TaylorState, taylor_accumulate_, taylor_score
from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.config import TargetSpec
from dpruner_lightning.estimate import check_fits, estimate_memory
from dpruner_lightning.methods import DPrunerMethod, LLMPrunerMethod, WandaMethod
from dpruner_lightning.methods.base import send_
from dpruner_lightning.pruning import calibrate

from .conftest import tiny_model
from .helpers import fused_kernels_compile, run_prune, tiny_spec, token_batches

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _run(model, method, n: int = 3):
    targets = find_targets(model)
    method.prepare(model, targets)
    device = next(model.parameters()).device
    calibrate(model, targets, method, {source: [b.to(device) for b in token_batches(seed, n)]
                                       for seed, source in enumerate(("general", "domain"))})
    return targets


def _state(method: DPrunerMethod) -> dict[str, dict[str, torch.Tensor]]:
    return {"general": method.general, "dual": method.dual, "original": method.original, "master": method.master}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [dict(general_estimator="taylor", max_grad_norm=1e-3), dict(general_estimator="obs", lambda_reg=0.0)],
                         ids=["taylor-clip", "obs-noreg"])
def test_dpruner_state_on_the_cpu_gives_the_same_scores_and_weights(device, kw):
    base = tiny_model("llama").to(torch.bfloat16)
    runs = {}
    for where in ("auto", "cpu"):
        model = copy.deepcopy(base).to(device)
        method = DPrunerMethod(alpha=1e-3, state_device=where, **kw)
        targets = _run(model, method)
        runs[where] = (method, targets)
        want = torch.device("cpu") if where == "cpu" else torch.device(device)
        for group, tensors in _state(method).items():
            assert tensors, group
            for name, t in tensors.items():
                assert t.device == want, (group, name)
                if where == "cpu" and device != "cpu":
                    assert t.is_pinned(), (group, name)  # copies to and from the accelerator do not block
        assert all(t.weight.grad is None for t in targets.values())  # freed once applied
    (auto, t_auto), (cpu, t_cpu) = runs["auto"], runs["cpu"]
    for group, tensors in _state(auto).items():
        for name, t in tensors.items():
            # The same arithmetic on another device: equal on the CPU, equal to rounding on an accelerator.
            torch.testing.assert_close(_state(cpu)[group][name].to(t.device), t, rtol=1e-5 if device != "cpu" else 0,
                                       atol=1e-7 if device != "cpu" else 0, msg=f"{group} {name}")
    for name, t in t_auto.items():
        torch.testing.assert_close(t_cpu[name].weight, t.weight, rtol=0 if device == "cpu" else 1e-2, atol=0 if device == "cpu" else 1e-3)


def test_state_device_is_validated_and_chosen_per_weight():
    with pytest.raises(ValueError, match="state_device must be 'auto'.*or 'cpu'"):
        DPrunerMethod(state_device="gpu")
    # meta stands in for an accelerator: the state follows the weight unless told cpu, and pins only then
    weight = torch.empty(4, 4, device="meta")
    assert DPrunerMethod().state_device_of(weight) == torch.device("meta")
    assert DPrunerMethod(state_device="cpu").state_device_of(weight) == torch.device("cpu")
    state = DPrunerMethod(state_device="cpu").new_state(torch.empty(4, 4, dtype=torch.bfloat16))
    assert state.device.type == "cpu" and state.dtype == torch.float32 and not state.is_pinned()


def test_send_converts_into_the_destination_dtype():
    dst = torch.zeros(3, 2, dtype=torch.bfloat16).t()
    src = torch.randn(2, 3)
    send_(dst, src)
    assert torch.equal(dst, src.to(torch.bfloat16))


def test_general_pass_frees_each_gradient_once_accumulated():
    model = tiny_model("llama")
    targets = find_targets(model)
    method = DPrunerMethod()
    method.prepare(model, targets)
    p = method.passes()[0]
    method.start_pass(p)
    for t in targets.values():
        t.weight.requires_grad_(True)
    model(input_ids=token_batches(0, 1)[0], labels=token_batches(0, 1)[0]).loss.backward()
    assert all(t.weight.grad is not None for t in targets.values())
    method.after_backward(p)
    assert all(t.weight.grad is None for t in targets.values())
    assert all(s.count == 1 for s in method._taylor.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_process_steps_in_after_backward_as_sgd_step_would(dtype):
    """On one process the dual step is taken in after_backward, in fp32; on several it goes through the
    gradient to sgd_step (rounded to the weights' dtype). Both give the same weights and S."""
    base = tiny_model("llama").to(dtype)
    runs = []
    for world in (1, 2):  # 2: the multi-process code path, on one process (nothing to average)
        model = copy.deepcopy(base)
        method = DPrunerMethod(alpha=1e-2, lambda_reg=1.0, max_grad_norm=5.0)
        method.world_size = world
        targets = _run(model, method)
        runs.append((method, targets))
    (one, t_one), (many, t_many) = runs
    for name, t in t_one.items():
        if dtype == torch.float32:
            torch.testing.assert_close(t.weight, t_many[name].weight, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(one.dual[name], many.dual[name], rtol=1e-5, atol=1e-7)
        else:  # the multi-process step is rounded to bf16 before the fp32 master takes it: close, not equal
            for a, b in ((one.master[name], many.master[name]), (one.dual[name], many.dual[name])):
                assert float((a - b).norm() / b.norm()) < 0.02, name
    start = {n: t.weight_view().float() for n, t in find_targets(base).items()}
    now = {n: one.master[n] if n in one.master else t.weight_view() for n, t in t_one.items()}
    assert sum(int((now[n] != start[n]).sum()) for n in now) > 0.9 * sum(w.numel() for w in start.values())  # steps taken


def test_in_place_taylor_score_equals_the_plain_one():
    torch.manual_seed(0)
    w = torch.randn(6, 9).to(torch.bfloat16)
    state = TaylorState(torch.empty(6, 9), torch.empty(6, 9))  # uninitialised: the first gradient is written over it
    plain = TaylorState.zeros_like(w)
    for _ in range(3):
        g = torch.randn(6, 9)
        taylor_accumulate_(state, g, work=torch.empty(6, 9))
        taylor_accumulate_(plain, g)
    expected = taylor_score(plain, w)
    got = taylor_score(state, w, in_place=True)
    assert got.data_ptr() == state.grad_sum.data_ptr()  # no new matrix
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [lambda sd: WandaMethod(state_device=sd), lambda sd: LLMPrunerMethod(state_device=sd)],
                         ids=["wanda", "llm_pruner"])
def test_baselines_with_state_on_the_cpu_give_the_same_scores(make):
    results = []
    for where in ("auto", "cpu"):
        model = tiny_model("llama")
        method = make(where)
        targets = find_targets(model)
        method.prepare(model, targets)
        calibrate(model, targets, method, {"general": token_batches(0, 2), "domain": token_batches(1, 2)})
        results.append(method.artifacts() if isinstance(method, LLMPrunerMethod) else method.scores())
    flat = [{f"{g}/{n}": t for g, ts in r.items() for n, t in (ts.items() if isinstance(ts, dict) else [("", ts)])} for r in results]
    assert flat[0].keys() == flat[1].keys() and flat[0]
    for key in flat[0]:
        assert torch.equal(flat[0][key], flat[1][key]), key


def test_estimate_reports_host_state_apart_and_checks_only_device_bytes_against_the_device(monkeypatch):
    spec = tiny_spec(dtype="bfloat16")
    on_device = estimate_memory(spec, DPrunerMethod(), TargetSpec(), batch_size=2, seq_len=32)
    offloaded = estimate_memory(spec, DPrunerMethod(state_device="cpu"), TargetSpec(), batch_size=2, seq_len=32)
    assert offloaded.method_state == 0 and offloaded.host_state == on_device.method_state > 0
    assert offloaded.total == on_device.total - on_device.method_state
    assert offloaded.on(torch.device("cpu")) == on_device.total  # on the CPU, host state is device memory
    assert "host memory" in offloaded.describe()
    # An accelerator with room for the weights, gradients and activations but not the state (meta stands in:
    # torch.device("cuda") needs no CUDA to be named).
    cuda = torch.device("cuda")
    room = {"cuda": offloaded.total + on_device.method_state // 2, "cpu": 10 * on_device.total}
    monkeypatch.setattr("dpruner_lightning.estimate.available_bytes", lambda device: room[device.type])
    check_fits(offloaded, cuda, "offloaded")  # fits: the state is not device memory
    with pytest.raises(ValueError, match="will not fit on cuda.*state_device cpu"):
        check_fits(on_device, cuda, "on the device")
    room["cpu"] = on_device.method_state // 2
    with pytest.raises(ValueError, match="state in host memory needs .*state_device auto"):
        check_fits(offloaded, cuda, "offloaded")


def test_state_device_is_a_yaml_setting(tmp_path, monkeypatch):
    pytest.importorskip("jsonargparse", reason="the CLI's parser (the [test] extra installs it; the GPU image has none)")
    from dpruner_lightning.lightning_cli import DPrunerCLI

    from .conftest import REPO

    monkeypatch.chdir(tmp_path)
    cli = DPrunerCLI(args=["--config", str(REPO / "configs" / "smoke.yaml"), "--model.method.init_args.state_device", "cpu"],
                     run=False)
    assert cli.model.method.state_device == "cpu"


def test_host_state_is_summed_over_ranks_through_the_weights_device():
    """NCCL sums accelerator tensors only: host state goes through a copy on the weights' device. On CPU
    weights the collective is used as it is."""
    def all_reduce_sum(t):
        return t.mul_(2)  # two ranks holding the same values

    model = tiny_model("llama")
    method = DPrunerMethod(state_device="cpu")
    method.prepare(model, find_targets(model))
    assert method.state_collective(all_reduce_sum) is all_reduce_sum
    if not torch.cuda.is_available():
        return
    method.prepare(model.cuda(), find_targets(model))
    seen = []
    reduce_ = method.state_collective(lambda t: seen.append(t.device.type) or all_reduce_sum(t))
    host = torch.ones(3)
    assert reduce_(host) is host and torch.equal(host, torch.full((3,), 2.0)) and seen == ["cuda"]


# -- gradients consumed during the backward ---------------------------------------------------------
def _watch_live_gradients(method: DPrunerMethod, live: list[int]) -> None:
    """Record, each time a matrix is consumed, how many target gradients exist at that moment."""
    for attr in ("_taylor_matrix", "_dual_matrix"):
        def counted(name, t, *args, _inner=getattr(method, attr), **kwargs):
            live.append(sum(x.weight.grad is not None for x in method.targets.values()))
            return _inner(name, t, *args, **kwargs)
        setattr(method, attr, counted)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kw", [dict(), dict(kernels="compiled")], ids=["eager", "compiled"])
def test_gradients_consumed_in_the_backward_one_at_a_time_give_the_same_results(kw, device):
    if kw and not fused_kernels_compile(device):
        pytest.skip(f"torch.compile cannot build kernels on {device} here (no C++ compiler / Triton)")
    base = tiny_model("llama").to(torch.bfloat16).to(device)
    runs, live = {}, {}
    for how in ("after", "during"):
        model = copy.deepcopy(base)
        method = DPrunerMethod(alpha=1e-2, lambda_reg=5.0, **kw)
        if how == "after":
            method._in_backward = lambda dual: False  # the path every gradient takes under DDP or a loss scaler
        live[how] = []
        _watch_live_gradients(method, live[how])
        runs[how] = (method, _run(model, method))
    (after, t_after), (during, t_during) = runs["after"], runs["during"]
    assert max(live["during"]) == 1  # only the gradient being consumed exists: the others are freed or not yet computed
    assert max(live["after"]) == len(t_after)  # every target's gradient exists at the end of a backward
    for group, tensors in _state(after).items():
        for name, t in tensors.items():  # the same arithmetic in another order of matrices: identical
            torch.testing.assert_close(_state(during)[group][name], t, rtol=0, atol=0, msg=f"{group} {name}")
    for name, t in t_after.items():
        torch.testing.assert_close(t_during[name].weight, t.weight, rtol=0, atol=0)
        assert not t.weight._post_accumulate_grad_hooks  # removed at the end of each pass


def test_the_estimate_counts_two_gradients_when_they_are_consumed_in_the_backward(tmp_path):
    spec, targets = tiny_spec(), find_targets(tiny_model("llama"))
    largest, every = max(t.numel() for t in targets.values()), sum(t.numel() for t in targets.values())
    method = DPrunerMethod()
    assert estimate_memory(spec, method, TargetSpec(), 2, 32).gradients == every * 4  # e.g. under DDP
    method.gradients_final_in_backward = True
    assert estimate_memory(spec, method, TargetSpec(), 2, 32).gradients == 2 * largest * 4
    method.max_grad_norm = 1.0  # the clip's global norm needs every gradient of the step first
    assert estimate_memory(spec, method, TargetSpec(), 2, 32).gradients == every * 4
    assert run_prune(tmp_path).method.gradients_final_in_backward  # a one-process CPU fit consumes them in the backward


def test_llm_pruner_consumes_its_gradients_in_the_backward_with_the_same_importance(monkeypatch):
    base, runs, live = tiny_model("llama"), {}, {}
    for how in ("after", "during"):
        if how == "after":  # the path under DDP or a loss scaler
            monkeypatch.setattr(LLMPrunerMethod, "consumes_in_backward", property(lambda self: False))
        else:
            monkeypatch.undo()
        method, seen = LLMPrunerMethod(), []
        inner = method._accumulate

        def counted(name, _inner=inner, _method=method, _seen=seen):
            _seen.append(sum(p.grad is not None for p in _method._params.values()))
            return _inner(name)

        method._accumulate = counted
        _run(copy.deepcopy(base), method)
        runs[how], live[how] = method, seen
    assert max(live["during"]) == 1 and max(live["after"]) > 1
    assert runs["after"].importance.keys() == runs["during"].importance.keys()
    for block, groups in runs["after"].importance.items():
        for kind, scores in groups.items():
            assert torch.equal(runs["during"].importance[block][kind], scores), (block, kind)
    assert not runs["during"].gradients_hooked  # removed at the end of the pass
