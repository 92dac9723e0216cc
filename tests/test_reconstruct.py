"""Reconstruction of kept weights for a fixed mask (algorithms/reconstruct.py) and the sequential driver."""

import pytest
import torch

from dpruner_lightning.algorithms.hessian import damped
from dpruner_lightning.algorithms.lstsq import masked_least_squares_
from dpruner_lightning.algorithms.masks import select_mask
from dpruner_lightning.algorithms.reconstruct import (
    exact_reconstruct_,
    obs_reconstruct_,
    reconstruct_,
    reconstruction_error,
)
from dpruner_lightning.algorithms.sequential import sequential_blockwise, weighted_sets
from dpruner_lightning.algorithms.targets import find_targets


def _problem(rows=12, cols=24, tokens=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs (shared factors), so that compensation matters
    X = torch.randn(tokens, 6, generator=g) @ torch.randn(6, cols, generator=g) + 0.3 * torch.randn(tokens, cols, generator=g)
    W = torch.randn(rows, cols, generator=g)
    H = 2.0 / tokens * X.t() @ X
    keep = select_mask(torch.rand(rows, cols, generator=g), 0.5, "layer")
    return X, W, H, keep


def _naive_lstsq(W, X, keep):
    """Per row: min ||X_K w'_K - X w||, with torch.linalg.lstsq (the reference)."""
    out = torch.zeros_like(W, dtype=torch.float64)
    Xd = X.double()
    for r in range(W.shape[0]):
        K = keep[r].nonzero().squeeze(1)
        sol = torch.linalg.lstsq(Xd[:, K], Xd @ W[r].double().unsqueeze(1)).solution.squeeze(1)
        out[r, K] = sol
    return out


def test_exact_solver_equals_naive_least_squares():
    X, W, H, keep = _problem()
    ref = _naive_lstsq(W, X, keep)
    runs = {"cholesky, one row at a time": dict(method="cholesky", chunk_bytes=1),
            "cholesky, all rows at once": dict(method="cholesky"),
            "cg from the masked weights": dict(method="cg", tol=1e-9, max_iter=500)}
    for label, kwargs in runs.items():
        W2 = W.clone()
        masked_least_squares_(W2, H, keep, damp=0.0, **kwargs)
        rel = (W2.double() - ref).norm() / ref.norm()
        assert rel < 1e-4, (label, float(rel))
        assert torch.equal(W2 != 0, keep)  # mask unchanged: pruned exactly zero, kept nonzero here


def _naive_sequential_obs(W, H, keep, damp):
    """Textbook OBS, one column at a time: prune the masked weights of column j and update the later
    columns with the inverse of the damped Hessian of the columns not yet processed."""
    A = damped(H, damp).double()
    W = W.double().clone()
    cols = W.shape[1]
    for j in range(cols):
        Hinv = torch.linalg.inv(A[j:, j:])
        for r in range(W.shape[0]):
            if not keep[r, j]:
                W[r, j:] -= W[r, j] / Hinv[0, 0] * Hinv[0, :]
                W[r, j] = 0.0
    return W


@pytest.mark.parametrize("block_size", [5, 128])
def test_obs_solver_is_no_worse_than_naive_sequential_obs(block_size):
    X, W, H, keep = _problem(seed=1)
    W_obs = W.clone()
    obs_reconstruct_(W_obs, H, keep, block_size=block_size, damp=0.01)
    naive = _naive_sequential_obs(W, H, keep, 0.01)
    e_obs, e_naive = reconstruction_error(W, W_obs, H), reconstruction_error(W, naive, H)
    assert e_obs <= e_naive * (1 + 1e-4), (e_obs, e_naive)
    assert torch.equal(W_obs != 0, keep)


def test_solvers_order_exact_obs_none():
    X, W, H, keep = _problem(rows=16, cols=32, seed=2)
    errs = {}
    for solver in ("none", "obs", "exact"):
        W2 = W.clone()
        out = reconstruct_(W2, H, keep, solver)
        assert torch.equal(out, keep)
        assert torch.count_nonzero(W2[~keep]) == 0
        errs[solver] = reconstruction_error(W, W2, H)
    assert errs["exact"] <= errs["obs"] * (1 + 1e-6) and errs["obs"] < errs["none"], errs
    W3 = W.clone()
    exact_reconstruct_(W3, H, keep, tol=1e-9, max_iter=500)  # converged CG = the direct solution
    W4 = W.clone()
    masked_least_squares_(W4, H, keep, method="cholesky")
    torch.testing.assert_close(W3, W4, rtol=1e-3, atol=1e-4)


def test_reconstruct_writes_through_a_transposed_view():
    X, W, H, keep = _problem(seed=3)
    storage = W.t().contiguous()  # Conv1D-style in x out storage
    reconstruct_(storage.t(), H, keep, "exact")
    W2 = W.clone()
    reconstruct_(W2, H, keep, "exact")
    torch.testing.assert_close(storage.t(), W2)


def test_reconstruct_rejects_unknown_solver_and_bad_shapes():
    X, W, H, keep = _problem()
    with pytest.raises(ValueError, match="one of none, obs, exact"):
        reconstruct_(W, H, keep, "admm")
    with pytest.raises(ValueError, match="keep must be shaped like W"):
        exact_reconstruct_(W, H, keep[:, :3])
    with pytest.raises(ValueError, match="keep like W"):
        masked_least_squares_(W, H, keep[:, :3])
    with pytest.raises(ValueError, match="'cg' or 'cholesky'"):
        masked_least_squares_(W, H, keep, method="lu")


def test_weighted_sets_checks_the_mix():
    a, b = [torch.zeros(1, 4, dtype=torch.long)], [torch.ones(1, 4, dtype=torch.long)]
    assert weighted_sets(a) == [(a, 1.0)]
    assert weighted_sets(a, b, 1.0) == [(b, 1.0)]
    assert [w for _, w in weighted_sets(a, b, 0.25)] == [0.75, 0.25]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        weighted_sets(a, b, 1.5)
    with pytest.raises(ValueError, match="second calibration set"):
        weighted_sets(a, None, 0.5)


def test_sequential_driver_mixes_hessians_as_documented():
    """With weights (0.5, 0.5) over two sets, the first block's Hessians are the mean of each set's."""
    from dpruner_lightning.algorithms.hessian import InputStatistics
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    targets = find_targets(model)
    first = {n: t for n, t in targets.items() if ".layers.0." in n}
    g = torch.Generator().manual_seed(0)
    a = [torch.randint(0, 50, (2, 8), generator=g)]
    b = [torch.randint(0, 50, (2, 8), generator=g)]
    seen: dict[str, torch.Tensor] = {}

    def solve(name, target, H):
        seen[name] = H.clone()
        return torch.ones(target.shape, dtype=torch.bool)

    sequential_blockwise(model, first, weighted_sets(a, b, 0.5), solve)
    expected = {}
    for batches in (a, b):
        with InputStatistics(first, kind="hessian") as stats:
            model(input_ids=batches[0])
        for n in first:
            expected[n] = expected.get(n, 0) + 0.5 * stats.hessian(n)
    for n in first:
        torch.testing.assert_close(seen[n], expected[n], rtol=1e-4, atol=1e-6)


# -- through the methods and the Lightning fit --------------------------------------------------------

def test_methods_collect_the_batches_their_hessian_mix_needs():
    from dpruner_lightning.methods import DPrunerMethod, MagnitudeMethod, SparseGPTMethod, WandaMethod

    assert [p.name for p in WandaMethod().passes()] == ["calibration"]
    assert [p.name for p in WandaMethod(reconstruct="obs").passes()] == ["calibration", "batches_domain"]
    assert [p.source for p in MagnitudeMethod(reconstruct="exact", hessian_mix=0.5).passes()][-2:] == ["domain", "general"]
    assert [p.source for p in SparseGPTMethod(source="general").passes()] == ["general"]
    assert [p.source for p in SparseGPTMethod(hessian_mix=0.3).passes()] == ["domain", "general"]
    assert [p.name for p in DPrunerMethod(reconstruct="obs", hessian_mix=1.0).passes()] == ["general", "dual", "batches_general"]
    assert WandaMethod(reconstruct="obs").multi_process is False and WandaMethod().multi_process is True


def test_reconstruction_options_are_checked_when_built():
    from dpruner_lightning.methods import DPrunerMethod, LLMPrunerMethod, WandaMethod

    with pytest.raises(ValueError, match="hessian_mix must be in"):
        WandaMethod(reconstruct="obs", hessian_mix=1.5)
    with pytest.raises(ValueError, match="one of none, obs, exact"):
        DPrunerMethod(reconstruct="lstsq")
    with pytest.raises(ValueError, match="set reconstruct: obs"):
        DPrunerMethod(selection="sequential")
    with pytest.raises(ValueError, match="reconstruct must be 'none'"):
        llm = LLMPrunerMethod()
        llm.configure_reconstruction("obs")


@pytest.mark.parametrize("solver", ["obs", "exact"])
def test_reconstruction_keeps_the_mask_and_moves_the_kept_weights(tmp_path, solver):
    from dpruner_lightning.methods import WandaMethod
    from tests.helpers import mask_hash, run_prune

    plain = run_prune(tmp_path, method=WandaMethod(), validate=False)
    rec = run_prune(tmp_path, method=WandaMethod(reconstruct=solver, hessian_mix=0.5), validate=False)
    assert mask_hash(plain.result.masks) == mask_hash(rec.result.masks)
    moved = 0
    for name, t in rec.targets.items():
        w, keep = t.weight_view(), rec.result.masks[name]
        assert torch.count_nonzero(w[~keep]) == 0, name
        moved += int((w[keep] - plain.targets[name].weight_view()[keep]).abs().gt(1e-6).sum())
    assert moved > 0
    assert rec.result.sparsity_realised["targets"] == pytest.approx(0.5, abs=1e-3)


def test_sequential_selection_without_dual_weight_is_sparsegpt(tmp_path):
    """D-PRUNER's ``selection: sequential`` with exponent 0 scores by the OBS saliency alone: it must give
    SparseGPT's masks and weights on the same mixed Hessian (the dual pass's weights are discarded)."""
    from dpruner_lightning.config import MaskSpec
    from dpruner_lightning.methods import DPrunerMethod, SparseGPTMethod
    from tests.helpers import mask_hash, run_prune

    for mask in (MaskSpec(sparsity=0.5), MaskSpec(granularity="2:4")):
        sgpt = run_prune(tmp_path, method=SparseGPTMethod(hessian_mix=0.5), mask=mask, validate=False)
        dp = run_prune(tmp_path, method=DPrunerMethod(reconstruct="obs", hessian_mix=0.5, selection="sequential",
                                                      dual_exponent=0.0), mask=mask, validate=False)
        assert mask_hash(sgpt.result.masks) == mask_hash(dp.result.masks)
        for name, t in sgpt.targets.items():
            torch.testing.assert_close(t.weight_view(), dp.targets[name].weight_view(), rtol=1e-5, atol=1e-6)
        weighted = run_prune(tmp_path, method=DPrunerMethod(reconstruct="obs", hessian_mix=0.5, selection="sequential",
                                                            dual_exponent=1.0), mask=mask, validate=False)
        assert mask_hash(weighted.result.masks) != mask_hash(sgpt.result.masks)  # the dual importance changes the choice
