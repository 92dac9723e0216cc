"""TensorBoard figures: the numbers behind them on hand-made inputs, and the images a tiny fit run and a
comparison log, read back from the event files."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from dpruner_lightning import figures
from dpruner_lightning.analysis import block_kind_grid, importance_kept, importance_totals
from dpruner_lightning.comparison_figures import (
    log_comparison_figures,
    mask_overlap,
    pack_masks,
    packed_masks_of_saved_rows,
    perplexity_series,
    sample_rows,
    series_label,
)
from dpruner_lightning.config import MaskSpec, OutputSpec
from dpruner_lightning.figures import log_hist2d, sample_pairs
from dpruner_lightning.methods import MagnitudeMethod
from dpruner_lightning.module import DPrunerModule
from dpruner_lightning.pruning import PruneResult
from dpruner_lightning.quiet import install_known_filters
from dpruner_lightning.run_figures import add_run_figures, importance_before

from .helpers import smoke_data, tiny_spec

Q0, U0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"
RUN_IMAGES = ("masks/sparsity_by_block_and_kind", "importance/kept_by_block_and_kind", "importance/general_vs_dual")


def tb_images(log_dir: Path) -> dict[str, tuple[int, int, int]]:
    """``{tag: (width, height, encoded bytes)}`` of the last image of every tag in the event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return {tag: (e.width, e.height, len(e.encoded_image_string)) for tag in acc.Tags()["images"] for e in acc.Images(tag)[-1:]}


def tb_scalars(log_dir: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}


# -- importance kept ------------------------------------------------------------------------------
@pytest.fixture
def hand_made() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    scores = {Q0: torch.tensor([[1.0, 2.0], [3.0, 4.0]]), U0: torch.ones(2, 2), Q1: torch.tensor([[5.0, 5.0], [0.0, 0.0]])}
    masks = {Q0: torch.tensor([[True, False], [True, False]]),  # keeps 1 + 3 of 10
             U0: torch.tensor([[True, True], [False, False]]),  # keeps 2 of 4
             Q1: torch.tensor([[False, True], [True, True]])}  # keeps 5 of 10
    return scores, masks


def test_importance_kept_exact(hand_made):
    scores, masks = hand_made
    stats = importance_kept(scores, masks)
    assert stats["per_matrix"][Q0]["share"] == pytest.approx(0.4)
    assert stats["per_matrix"][U0]["share"] == pytest.approx(0.5)
    assert stats["per_matrix"][Q1]["share"] == pytest.approx(0.5)
    assert stats["per_matrix"][Q0]["weights_kept"] == pytest.approx(0.5)
    assert stats["per_block"][0]["share"] == pytest.approx(6 / 14)  # masses pooled, not ratios averaged
    assert stats["per_block"][1]["share"] == pytest.approx(0.5)
    assert stats["per_kind"]["q_proj"]["share"] == pytest.approx(9 / 20)
    assert stats["overall"]["share"] == pytest.approx(11 / 24)
    blocks, kinds, grid, per_block, overall = block_kind_grid(stats, "share")
    assert blocks == [0, 1] and kinds == ["q_proj", "up_proj"]
    assert grid[0, 0] == pytest.approx(0.4) and grid[0, 1] == pytest.approx(0.5) and grid[1, 0] == pytest.approx(0.5)
    assert math.isnan(grid[1, 1]) and per_block == pytest.approx([6 / 14, 0.5]) and overall == pytest.approx(11 / 24)


def test_importance_kept_with_totals_taken_before_pruning(hand_made):
    """Magnitude-like scores are zero where pruned once the masks are applied: the totals taken before
    pruning are the denominators."""
    scores, masks = hand_made
    totals = importance_totals(scores)
    assert totals == {Q0: 10.0, U0: 4.0, Q1: 10.0}
    after = {n: s * masks[n] for n, s in scores.items()}
    assert importance_kept(after, masks)["overall"]["share"] == pytest.approx(1.0)  # what the totals prevent
    assert importance_kept(after, masks, totals)["overall"]["share"] == pytest.approx(11 / 24)


def test_importance_kept_refuses_bad_input(hand_made):
    scores, masks = hand_made
    with pytest.raises(ValueError, match="no scores for masked matrices"):
        importance_kept({Q0: scores[Q0]}, masks)
    with pytest.raises(ValueError, match="shapes differ"):
        importance_kept({**scores, U0: torch.ones(4)}, masks)
    with pytest.raises(ValueError, match="negative"):
        importance_kept({**scores, U0: -torch.ones(2, 2)}, masks)
    with pytest.raises(ValueError, match="totals lack"):
        importance_kept(scores, masks, totals={Q0: 1.0})


# -- G vs S sample ---------------------------------------------------------------------------------
def test_sample_pairs_takes_both_scores_and_the_mask_at_the_same_positions():
    g = {Q0: torch.arange(1.0, 1 + 64 * 32).view(64, 32), U0: torch.arange(1.0, 1 + 128 * 32).view(128, 32)}
    s = {n: 2 * t for n, t in g.items()}
    masks = {n: (torch.arange(t.numel()) % 2 == 0).view(t.shape) for n, t in g.items()}  # even flat index kept
    pairs = sample_pairs(g, s, masks, n=600, seed=3)
    assert 590 <= len(pairs["x"]) <= 600  # proportional shares, rounded down
    assert np.array_equal(pairs["y"], 2 * pairs["x"])
    assert np.array_equal(pairs["kept"], (pairs["x"] - 1) % 2 == 0)  # value v sits at flat index v - 1
    assert np.array_equal(sample_pairs(g, s, masks, n=600, seed=3)["x"], pairs["x"])
    assert not np.array_equal(sample_pairs(g, s, masks, n=600, seed=4)["x"], pairs["x"])
    with pytest.raises(ValueError, match="n must be"):
        sample_pairs(g, s, masks, n=0)


def test_log_hist2d_counts_and_leaves_out_what_a_log_axis_cannot_show():
    x = [1.0, 10.0, 100.0, 0.0, -1.0, float("nan")]
    y = [1.0, 10.0, 100.0, 1.0, 1.0, 1.0]
    hist = log_hist2d(x, y, [True, False, True, True, True, True], bins=4)
    assert hist["n"] == 3 and hist["left_out"] == 3
    assert hist["counts"].sum() == 3 and hist["kept"].sum() == 2
    assert hist["x_edges"][0] == pytest.approx(1.0) and hist["x_edges"][-1] == pytest.approx(100.0)
    assert hist["counts"][0, 0] == 1 and hist["counts"][-1, -1] == 1 and hist["kept"][-1, -1] == 1
    with pytest.raises(ValueError, match="1-D of one length"):
        log_hist2d([1.0], [1.0, 2.0], [True])


# -- a fit run's images ----------------------------------------------------------------------------
class RecordingWriter:
    """The SummaryWriter calls the figure code makes, recorded."""

    def __init__(self) -> None:
        self.images: dict[str, np.ndarray] = {}
        self.scalars: dict[str, float] = {}
        self.texts: dict[str, str] = {}

    def add_image(self, tag, image, step, dataformats):
        assert dataformats == "HWC" and image.dtype == np.uint8 and image.shape[2] == 3
        self.images[tag] = image

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = value

    def add_text(self, tag, text, step):
        self.texts[tag] = text


class ScoredMethod(MagnitudeMethod):
    """A stand-in whose scores are given (and can change, as re-solved weights' would)."""

    def __init__(self, scores: dict[str, torch.Tensor], reconstruct: str = "none") -> None:
        super().__init__()
        self.given, self.reconstruct = scores, reconstruct

    def scores(self) -> dict[str, torch.Tensor]:
        return self.given


def _result(masks: dict[str, torch.Tensor]) -> PruneResult:
    return PruneResult(method="stub", method_repr="ScoredMethod()", granularity="layer", allocation="uniform", sparsity_target=0.5,
                       sparsity_realised={"targets": 0.5, "all_parameters": 0.4}, per_matrix={}, parameters={}, masks=masks)


def test_run_figures_log_the_importance_kept_and_skip_it_when_the_scores_moved(hand_made, caplog):
    pytest.importorskip("matplotlib")
    scores, masks = hand_made
    writer = RecordingWriter()
    method = ScoredMethod(scores)
    tags = add_run_figures(writer, _result(masks), method, importance_before(method))
    assert tags == list(RUN_IMAGES[:2]) == list(writer.images) and "run/summary" in writer.texts
    assert writer.scalars["importance/kept_share"] == pytest.approx(11 / 24)
    assert all(im.shape[0] > 200 and im.shape[1] > 400 for im in writer.images.values())
    # Weight-derived scores re-read after a reconstruction are not those the masks were chosen from.
    method = ScoredMethod(scores, reconstruct="obs")
    totals = importance_before(method)
    method.given = {n: s * 2 for n, s in scores.items()}
    writer = RecordingWriter()
    with caplog.at_level(logging.INFO, logger="dpruner_lightning.run_figures"):
        assert add_run_figures(writer, _result(masks), method, totals) == [RUN_IMAGES[0]]
    assert "importance/kept_share" not in writer.scalars and "re-solved" in caplog.text


def test_a_failing_figure_is_a_warning_not_a_failed_run(hand_made, caplog):
    pytest.importorskip("matplotlib")
    scores, masks = hand_made
    method = ScoredMethod(scores)
    totals = importance_before(method)
    method.given = {}  # scores() now misses every masked matrix: importance_kept raises
    writer = RecordingWriter()
    with caplog.at_level(logging.WARNING, logger="dpruner_lightning.run_figures"):
        assert add_run_figures(writer, _result(masks), method, totals) == []
    assert "TensorBoard figures of stub failed" in caplog.text and "no scores for masked matrices" in caplog.text
    assert "run/summary" in writer.texts


def test_without_matplotlib_the_text_is_logged_and_the_images_skipped_saying_so_once(hand_made, caplog, monkeypatch):
    for mod in ("matplotlib", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes ``import mod`` raise ImportError
    monkeypatch.setattr(figures, "_missing_logged", False)
    scores, masks = hand_made
    writer = RecordingWriter()
    with caplog.at_level(logging.INFO, logger="dpruner_lightning.figures"):
        for _ in range(2):
            assert add_run_figures(writer, _result(masks), ScoredMethod(scores), importance_totals(scores)) == []
    assert writer.images == {} and "run/summary" in writer.texts
    assert caplog.text.count('pip install "dpruner-lightning[plot]"') == 1


def _fit(tmp_path: Path, method=None) -> tuple[DPrunerModule, Path]:
    install_known_filters()
    module = DPrunerModule(model=tiny_spec(), method=method, mask=MaskSpec(sparsity=0.5),
                           output=OutputSpec(export_model=False, save_importance=False, save_masks=False))
    logger = L.pytorch.loggers.TensorBoardLogger(save_dir=str(tmp_path), name="run", version=0)
    trainer = L.Trainer(**module.trainer_kwargs(), accelerator="cpu", devices=1, enable_checkpointing=False, logger=logger,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, smoke_data())
    return module, Path(logger.log_dir)


def test_dpruner_fit_logs_the_images_with_the_kept_share_of_s(tmp_path):
    pytest.importorskip("matplotlib")
    module, log_dir = _fit(tmp_path)
    images = tb_images(log_dir)
    for tag in RUN_IMAGES:
        width, height, size = images[tag]
        assert width > 400 and height > 200 and size > 1000, tag
    share = tb_scalars(log_dir)["importance/kept_share"]
    # S is kept after the run: the logged share is that of S under the run's masks, and the masks keep
    # the highest S of each group, so more than the half of the weights they keep.
    assert share == pytest.approx(importance_kept(module.method.scores(), module.result.masks)["overall"]["share"], rel=1e-6)
    assert 0.5 < share < 1.0


def test_magnitude_fit_logs_the_kept_share_of_the_weights_before_pruning_and_no_g_vs_s(tmp_path):
    pytest.importorskip("matplotlib")
    from dpruner_lightning.algorithms.targets import find_targets
    from dpruner_lightning.models import load_causal_lm

    module, log_dir = _fit(tmp_path, MagnitudeMethod())
    assert set(tb_images(log_dir)) == set(RUN_IMAGES[:2])
    dense = find_targets(load_causal_lm(tiny_spec()))  # the same seeded random model, unpruned
    with torch.no_grad():
        before = sum(float(t.weight_view().abs().sum()) for n, t in dense.items() if n in module.result.masks)
        kept = sum(float(t.weight_view().abs().sum()) for n, t in module.targets.items() if n in module.result.masks)
    share = tb_scalars(log_dir)["importance/kept_share"]
    assert share == pytest.approx(kept / before, rel=1e-5)
    assert 0.5 < share < 1.0  # the largest half of |W| holds more than half the mass, not all of it


# -- compare / sweep ---------------------------------------------------------------------------------
def test_series_group_a_sweeps_rows_by_method_and_setting():
    assert series_label("d_pruner s=0.3 lambda_reg=0.1") == "d_pruner lambda_reg=0.1"
    assert series_label("wanda") == "wanda"
    results = [
        {"method": "dense", "method_repr": "dense", "sparsity_targets": 0.0, "ppl_domain": 10.0, "ppl_general": 20.0},
        {"method": "magnitude s=0.5", "sparsity_targets": 0.5, "ppl_domain": 30.0, "ppl_general": 40.0},
        {"method": "magnitude s=0.3", "sparsity_targets": 0.3, "ppl_domain": 15.0, "ppl_general": float("inf")},
        {"method": "wanda s=0.3", "sparsity_requested": 0.3, "ppl_domain": 12.0, "ppl_general": 22.0},
        {"method": "wanda s=0.5", "error": "RuntimeError: boom"},
    ]
    series, dense = perplexity_series(results)
    assert dense == {"domain": 10.0, "general": 20.0}
    assert series == {"magnitude": {"domain": [(0.3, 15.0), (0.5, 30.0)], "general": [(0.5, 40.0)]},
                      "wanda": {"domain": [(0.3, 12.0)], "general": [(0.3, 22.0)]}}


def _random_masks(seed: int, sparsity: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {Q0: torch.rand(64, 48, generator=g) >= sparsity, U0: torch.rand(96, 48, generator=g) >= sparsity}


def test_overlap_of_identical_complementary_and_partial_masks():
    a = _random_masks(0)
    labels, jac = mask_overlap({"a": pack_masks(a), "same": pack_masks(a), "complement": pack_masks({n: ~k for n, k in a.items()})})
    assert labels == ["a", "same", "complement"]
    assert jac[0, 1] == 1.0 and jac[0, 2] == 0.0 and np.allclose(np.diag(jac), 1.0)
    one = {Q0: torch.tensor([False, False, True, True, True, True, True, True])}  # pruned {0, 1}
    two = {Q0: torch.tensor([True, False, False, True, True, True, True, True])}  # pruned {1, 2}
    packed = {"one": pack_masks(one), "two": pack_masks(two), "none": pack_masks({Q0: torch.ones(8, dtype=torch.bool)})}
    assert mask_overlap(packed)[1][0, 1] == pytest.approx(1 / 3)
    common = mask_overlap(packed, "pruned_in_common")[1]
    assert common[0, 1] == pytest.approx(0.5) and common[2, 0] == 1.0 and common[0, 2] == 0.0  # "none" prunes nothing
    assert np.array_equal(packed["one"].pruned(Q0), ~one[Q0].numpy())


def test_sampled_packing_is_shared_by_rows_and_estimates_the_overlap():
    a, b = _random_masks(1), _random_masks(2)
    picked = sample_rows({Q0: (64, 48), U0: (96, 48)}, 480, 7)
    assert {n: len(r) for n, r in picked.items()} == {Q0: 4, U0: 6}  # 480 of 7680 weights: 1/16 of the rows
    assert all(np.array_equal(picked[n], r) for n, r in sample_rows({U0: (96, 48), Q0: (64, 48)}, 480, 7).items())
    full = mask_overlap({"a": pack_masks(a), "b": pack_masks(b)})[1][0, 1]
    sampled = {"a": pack_masks(a, sample=2400, seed=7), "b": pack_masks(b, sample=2400, seed=7)}
    assert sampled["a"].nbytes < pack_masks(a).nbytes
    assert mask_overlap(sampled)[1][0, 1] == pytest.approx(full, abs=0.03)  # independent 50% masks: about 1/3
    assert mask_overlap({"a": sampled["a"], "a2": pack_masks(a, sample=2400, seed=7)})[1][0, 1] == 1.0
    complement = pack_masks({n: ~k for n, k in a.items()}, sample=2400, seed=7)
    assert mask_overlap({"a": sampled["a"], "complement": complement})[1][0, 1] == 0.0
    with pytest.raises(ValueError, match="same pack_masks"):
        mask_overlap({"a": sampled["a"], "full": pack_masks(b)})
    with pytest.raises(TypeError, match="bool keep-masks"):
        pack_masks({Q0: torch.ones(2, 2)})
    assert pack_masks(a, sample=10**9).layout() == pack_masks(a, sample=None).layout()  # all fit: stored exactly


def test_masks_saved_by_a_row_are_packed_from_its_folder(tmp_path):
    from dpruner_lightning.export import save_tensors

    a = _random_masks(5)
    save_tensors(tmp_path / "row" / "masks.safetensors", {n: k.to(torch.uint8) for n, k in a.items()})  # as runs store them
    results = [{"method": "saved", "log_dir": str(tmp_path / "row")}, {"method": "nothing saved", "log_dir": str(tmp_path)},
               {"method": "failed", "log_dir": str(tmp_path / "row"), "error": "RuntimeError: x"}]
    packed = packed_masks_of_saved_rows(results)
    assert list(packed) == ["saved"]
    assert mask_overlap({**packed, "live": pack_masks(a)})[1][0, 1] == 1.0


def test_comparison_figures_reach_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    from torch.utils.tensorboard import SummaryWriter

    results = [{"method": "dense", "method_repr": "dense", "sparsity_targets": 0.0, "ppl_domain": 10.0, "ppl_general": 20.0},
               {"method": "magnitude", "sparsity_targets": 0.5, "ppl_domain": 30.0, "ppl_general": 40.0},
               {"method": "wanda", "sparsity_targets": 0.5, "ppl_domain": 25.0, "ppl_general": 35.0}]
    masks = {"magnitude": pack_masks(_random_masks(0)), "wanda": _random_masks(1)}  # packed or raw
    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        tags = log_comparison_figures(writer, results, masks, prefix="sweep")
    assert tags == ["sweep/perplexity_vs_sparsity", "sweep/mask_overlap"]
    images = tb_images(tmp_path)
    assert set(images) == set(tags) and all(w > 300 and h > 200 and n > 1000 for w, h, n in images.values())
    logger = L.pytorch.loggers.TensorBoardLogger(save_dir=str(tmp_path / "logger"), name="", version="")
    assert log_comparison_figures(logger, results) == ["comparison/perplexity_vs_sparsity"]  # one row of masks: no overlap
    logger.experiment.flush()
    assert set(tb_images(tmp_path / "logger")) == {"comparison/perplexity_vs_sparsity"}
    with pytest.raises(TypeError, match="SummaryWriter or a TensorBoardLogger"):
        log_comparison_figures(object(), results)


def test_comparison_figure_that_cannot_be_drawn_is_a_warning(caplog):
    pytest.importorskip("matplotlib")
    writer = RecordingWriter()
    mixed = {"full": pack_masks(_random_masks(0), sample=None), "sampled": pack_masks(_random_masks(1), sample=2400)}
    results = [{"method": "wanda", "sparsity_targets": 0.5, "ppl_domain": 25.0, "ppl_general": 35.0}]
    with caplog.at_level(logging.WARNING, logger="dpruner_lightning.comparison_figures"):
        assert log_comparison_figures(writer, results, mixed) == ["comparison/perplexity_vs_sparsity"]
    assert "mask_overlap skipped" in caplog.text and "same pack_masks" in caplog.text
    assert list(writer.images) == ["comparison/perplexity_vs_sparsity"]
