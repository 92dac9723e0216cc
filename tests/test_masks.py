"""Mask selection: exact counts for every granularity, N:M groups, global threshold, OWL."""

from __future__ import annotations

import pytest
import torch

from dpruner_lightning.algorithms.masks import (
    choose_masks,
    global_masks,
    owl_sparsities,
    parse_granularity,
    select_mask,
)


@pytest.fixture
def score():
    torch.manual_seed(0)
    return torch.rand(12, 40)


def test_layer_prunes_exact_count_of_lowest(score):
    keep = select_mask(score, 0.3, "layer")
    k = round(0.3 * score.numel())
    assert int((~keep).sum()) == k
    assert float(score[~keep].max()) <= float(score[keep].min())


def test_row_prunes_exact_count_per_row(score):
    keep = select_mask(score, 0.5, "row")
    assert ((~keep).sum(1) == 20).all()
    for r in range(score.shape[0]):
        assert float(score[r][~keep[r]].max()) <= float(score[r][keep[r]].min())


def test_block_prunes_exact_count_per_column_block(score):
    keep = select_mask(score, 0.25, "block", block_size=16)  # blocks of 16, 16 and 8 columns
    for start, width in ((0, 16), (16, 16), (32, 8)):
        blk = keep[:, start : start + width]
        assert int((~blk).sum()) == round(0.25 * 12 * width)


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:4", 1, 4)])
def test_nm_every_group_has_exactly_n_zeros(score, pattern, n, m):
    keep = select_mask(score, 0.0, pattern)
    groups = (~keep).reshape(score.shape[0], -1, m).sum(-1)
    assert (groups == n).all()


def test_global_threshold_exact_over_all_matrices():
    torch.manual_seed(1)
    scores = {"a": torch.rand(8, 8) * 0.5, "b": torch.rand(4, 16) + 0.25, "c": torch.zeros(2, 4)}  # c: all ties
    masks = global_masks(scores, 0.4)
    total = sum(s.numel() for s in scores.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.4 * total)
    pruned = torch.cat([s[~masks[n]] for n, s in scores.items()])
    kept = torch.cat([s[masks[n]] for n, s in scores.items()])
    assert float(pruned.max()) <= float(kept.min())
    assert (~masks["c"]).all()  # zero scores go first
    assert masks["a"].float().mean() < masks["b"].float().mean()  # lower scores -> pruned more


def test_global_with_many_ties_is_still_exact():
    scores = {"a": torch.ones(10, 10), "b": torch.ones(5, 10)}
    masks = global_masks(scores, 0.5)
    assert sum(int((~m).sum()) for m in masks.values()) == 75


def test_owl_weighted_mean_is_target_and_outliers_get_less_sparsity():
    torch.manual_seed(2)
    plain = [torch.rand(16, 16)]
    spiky = [torch.rand(16, 16)]
    spiky[0][:4, :4] = 100.0  # many outliers
    sp = owl_sparsities({0: plain, 1: spiky, 2: [torch.rand(16, 16)]}, 0.5, outlier_m=5.0, lam=0.1)
    assert abs(sum(sp.values()) / 3 - 0.5) < 1e-9
    assert sp[1] < sp[0] == sp[2]
    assert abs((sp[0] - sp[1]) - 0.2) < 1e-9  # the spread is 2 * lam between least and most outliers


def test_choose_masks_owl_per_block_counts():
    torch.manual_seed(3)
    scores = {"b0": torch.rand(8, 16), "b1": torch.rand(8, 16)}
    scores["b1"][0, :8] = 50.0
    masks = choose_masks(scores, 0.5, "layer", allocation="owl", block_of={"b0": 0, "b1": 1}, owl_lambda=0.1)
    sparsity = {n: float((~m).float().mean()) for n, m in masks.items()}
    assert sparsity["b1"] < 0.5 < sparsity["b0"]
    assert abs((sparsity["b0"] + sparsity["b1"]) / 2 - 0.5) < 1 / 128 + 1e-9


@pytest.mark.parametrize("bad", ["3:2", "0:4", "2:2", "half", "2-4"])
def test_invalid_patterns_are_rejected_with_a_clear_error(bad):
    with pytest.raises(ValueError, match="N:M|granularity"):
        parse_granularity(bad)


def test_nm_needs_divisible_columns():
    with pytest.raises(ValueError, match="divisible by 4"):
        select_mask(torch.rand(4, 10), 0.0, "2:4")


@pytest.mark.parametrize("s", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_rejected(s):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        select_mask(torch.rand(4, 8), s, "layer")


@pytest.mark.parametrize("sparsity", [0.02, 0.95])
def test_owl_keeps_the_overall_sparsity_exact_at_extreme_requests(sparsity):
    """The [0, 0.999] clamp used to move the overall sparsity by 1-2% at these requests."""
    from dpruner_lightning.algorithms.masks import owl_sparsities

    g = torch.Generator().manual_seed(0)
    by_block = {}
    for b in range(6):  # blocks with very different outlier ratios, two sizes
        s = torch.rand(64, 64 * (1 + b % 2), generator=g)
        s[: b * 10] *= 40.0  # more outliers in later blocks
        by_block[b] = [s]
    got = owl_sparsities(by_block, sparsity, outlier_m=5.0, lam=0.08)
    sizes = {b: sum(t.numel() for t in mats) for b, mats in by_block.items()}
    mean = sum(got[b] * sizes[b] for b in got) / sum(sizes.values())
    assert mean == pytest.approx(sparsity, abs=1e-9)
    assert all(0.0 <= v <= 0.999 for v in got.values())
    assert max(got.values()) - min(got.values()) > 0.01  # the allocation still varies by block
