"""D-PRUNER's formulas on hand-made tensors and on a tiny model, against naive computations."""

from __future__ import annotations

import torch

from dpruner_lightning.algorithms.importance import (
    TaylorState,
    dual_accumulate_,
    normalise_mean_,
    regulariser_grad,
    taylor_accumulate_,
    taylor_score,
)
from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.config import MaskSpec
from dpruner_lightning.methods import DPrunerMethod
from dpruner_lightning.pruning import calibrate

from .conftest import tiny_model


def test_taylor_score_matches_formula():
    torch.manual_seed(0)
    w = torch.randn(5, 7)
    grads = [torch.randn(5, 7) for _ in range(4)]
    state = TaylorState.zeros_like(w)
    for g in grads:
        taylor_accumulate_(state, g.to(torch.bfloat16).float())  # any dtype in, fp32 sums
    g = torch.stack([x.to(torch.bfloat16).float() for x in grads])
    gbar, fisher = g.mean(0), (g * g).mean(0)
    expected = (gbar * w + 0.5 * w * w * fisher).abs()
    torch.testing.assert_close(taylor_score(state, w), expected)
    assert state.count == 4 and state.grad_sum.dtype == torch.float32


def test_normalise_mean_uses_one_global_scalar():
    a, b = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 2.0], [4.0, 0.0]])
    scores = {"a": a.clone(), "b": b.clone()}
    scale = normalise_mean_(scores)
    assert scale == 2.0  # (1+3+2+2+4+0)/6
    torch.testing.assert_close(scores["a"], a / 2)
    torch.testing.assert_close(scores["b"], b / 2)
    mean = (scores["a"].sum() + scores["b"].sum()) / 6
    assert abs(float(mean) - 1.0) < 1e-6


def test_regulariser_grad_matches_autograd():
    torch.manual_seed(1)
    g_imp, w0 = torch.rand(6, 4), torch.randn(6, 4)
    w = (w0 + 0.1 * torch.randn(6, 4)).requires_grad_(True)
    lam = 0.37
    (lam * (g_imp * (w - w0) ** 2).sum()).backward()
    torch.testing.assert_close(regulariser_grad(g_imp, w.detach(), w0, lam), w.grad)


def test_dual_accumulate_matches_formula():
    torch.manual_seed(2)
    s = torch.zeros(3, 5)
    steps = [(torch.randn(3, 5), torch.randn(3, 5)) for _ in range(3)]
    expected = torch.zeros(3, 5)
    for g, w in steps:
        dual_accumulate_(s, g, w)
        expected += (g * w + 0.5 * (g * w) ** 2).abs()
    torch.testing.assert_close(s, expected)


def _naive_grads(model, target_names, batch):
    model.zero_grad(set_to_none=True)
    model(input_ids=batch, labels=batch).loss.backward()
    params = dict(model.named_modules())
    return {n: params[n].weight.grad.detach().clone() for n in target_names}


def _drive(method, model, targets, general_batches, domain_batches):
    """The method's lifecycle through the pruning core, with no Trainer."""
    method.prepare(model, targets)
    calibrate(model, targets, method, {"general": general_batches, "domain": domain_batches})


def test_dpruner_passes_match_naive_simulation():
    """G (taylor, normalised) and S after SGD steps on the regularised loss, on a real tiny Llama."""
    torch.manual_seed(3)
    general = [torch.randint(0, 257, (2, 16)) for _ in range(3)]
    domain = [torch.randint(0, 257, (2, 16)) for _ in range(3)]
    lam, alpha = 0.5, 0.05

    model = tiny_model("llama")
    targets = find_targets(model)
    names = list(targets)
    method = DPrunerMethod(general_estimator="taylor", lambda_reg=lam, alpha=alpha, update="sgd")
    _drive(method, model, targets, general, domain)

    # Naive: per-batch gradients -> G; then SGD on L + lam*sum G (W-W0)^2 with autograd.
    ref = tiny_model("llama")
    mods = dict(ref.named_modules())
    w0 = {n: mods[n].weight.detach().clone() for n in names}
    grads = [_naive_grads(ref, names, b) for b in general]
    g_imp = {}
    for n in names:
        g = torch.stack([x[n] for x in grads])
        g_imp[n] = (g.mean(0) * w0[n] + 0.5 * w0[n] ** 2 * (g * g).mean(0)).abs()
    scale = sum(v.sum() for v in g_imp.values()) / sum(v.numel() for v in g_imp.values())
    g_imp = {n: v / scale for n, v in g_imp.items()}
    s_ref = {n: torch.zeros_like(w0[n]) for n in names}
    for b in domain:
        ref.zero_grad(set_to_none=True)
        loss = ref(input_ids=b, labels=b).loss
        loss = loss + lam * sum((g_imp[n] * (mods[n].weight - w0[n]) ** 2).sum() for n in names)
        loss.backward()
        with torch.no_grad():
            for n in names:
                g, w = mods[n].weight.grad, mods[n].weight
                s_ref[n] += (g * w + 0.5 * (g * w) ** 2).abs()
                w -= alpha * g
    for n in names:
        torch.testing.assert_close(method.general[n], g_imp[n], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(method.dual[n], s_ref[n], rtol=1e-4, atol=1e-7)
        # The weights really moved during the dual pass (otherwise the test proves little).
        assert not torch.equal(targets[n].weight_view(), w0[n])

    # Masks go onto the ORIGINAL weights: every kept weight equals W0 exactly.
    masks = method.prune(MaskSpec(sparsity=0.5, granularity="layer"))
    for n in names:
        w = targets[n].weight_view()
        torch.testing.assert_close(w[masks[n]], w0[n][masks[n]], rtol=0, atol=0)
        assert int((w == 0).sum()) >= int((~masks[n]).sum())


def test_alpha_zero_gives_domain_taylor_and_lambda_zero_no_regulariser():
    torch.manual_seed(4)
    general = [torch.randint(0, 257, (1, 16)) for _ in range(2)]
    domain = [torch.randint(0, 257, (1, 16)) for _ in range(2)]
    model = tiny_model("llama")
    targets = find_targets(model)
    w0 = {n: t.weight_view().detach().clone() for n, t in targets.items()}
    method = DPrunerMethod(lambda_reg=1.0, alpha=0.0)
    _drive(method, model, targets, general, domain)
    ref = tiny_model("llama")
    expected = {n: torch.zeros_like(w) for n, w in w0.items()}
    for b in domain:
        for n, g in _naive_grads(ref, list(targets), b).items():
            expected[n] += (g * w0[n] + 0.5 * (g * w0[n]) ** 2).abs()
    for n, t in targets.items():
        assert torch.equal(t.weight_view(), w0[n])  # alpha = 0: no update, so W - W0 = 0
        torch.testing.assert_close(method.dual[n], expected[n], rtol=1e-4, atol=1e-8)


def _one_dual_step(update: str, general_value: float, lam=0.1, alpha=3e-4, steps=1):
    """One tiny model, G set by hand, ``steps`` dual-pass steps; returns (method, targets, W0)."""
    torch.manual_seed(5)
    model = tiny_model("llama")
    targets = find_targets(model)
    method = DPrunerMethod(lambda_reg=lam, alpha=alpha, update=update)
    method.prepare(model, targets)
    method.general = {n: torch.full(t.shape, general_value) for n, t in targets.items()}
    p_dual = method.passes()[1]
    method.start_pass(p_dual)
    w0 = {n: t.weight_view().detach().clone() for n, t in targets.items()}
    for t in targets.values():
        t.weight.requires_grad_(True)
    opt = torch.optim.SGD([t.weight for t in targets.values()], lr=alpha)
    batch = torch.randint(0, 257, (2, 16))
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        method.after_backward(p_dual)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return method, targets, w0


def test_proximal_step_matches_closed_form():
    lam, alpha, g_val = 0.5, 0.05, 30.0
    method, targets, w0 = _one_dual_step("proximal", g_val, lam, alpha, steps=2)
    # Replay: step 1 from W0 (regulariser 0), step 2 closed form with the task gradient at W1.
    ref = tiny_model("llama")
    mods = dict(ref.named_modules())
    torch.manual_seed(5)
    tiny_model("llama")  # same seed consumption as _one_dual_step
    batch = torch.randint(0, 257, (2, 16))
    c = 2 * alpha * lam * g_val
    for _ in range(2):
        ref.zero_grad(set_to_none=True)
        ref(input_ids=batch, labels=batch).loss.backward()
        with torch.no_grad():
            for n in targets:
                w, g = mods[n].weight, mods[n].weight.grad
                w.copy_((w - alpha * g + c * w0[n]) / (1 + c))
    for n, t in targets.items():
        torch.testing.assert_close(t.weight_view(), mods[n].weight, rtol=1e-5, atol=1e-7)


def test_proximal_is_stable_where_plain_sgd_diverges():
    # 2*alpha*lambda*G = 2 * 3e-4 * 0.1 * 1e6 = 60 > 2: explicit SGD multiplies W - W0 by -59 per step.
    sgd, sgd_targets, w0 = _one_dual_step("sgd", 1e6, steps=6)
    prox, prox_targets, _ = _one_dual_step("proximal", 1e6, steps=6)
    drift = lambda targets: max(float((t.weight_view().detach() - w0[n]).abs().max()) for n, t in targets.items())  # noqa: E731
    assert drift(sgd_targets) > 1e3  # diverged: the drift grows ~59x per step
    assert drift(prox_targets) < 1e-4  # pinned near W0 by the huge general importance
    assert all(torch.isfinite(s).all() for s in prox.dual.values())
