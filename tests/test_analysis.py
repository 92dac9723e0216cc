"""Mask analysis and the performance tracker: exact numbers on hand-made masks and measurements."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from dpruner_lightning.analysis import MaskAnalyzer, PerformanceTracker, load_masks
from dpruner_lightning.export import save_tensors


def _mask(shape: tuple[int, int], pruned: int) -> torch.Tensor:
    """Bool mask with exactly ``pruned`` False entries (the first ones in row-major order)."""
    keep = torch.ones(shape[0] * shape[1], dtype=torch.bool)
    keep[:pruned] = False
    return keep.view(shape)


@pytest.fixture
def llama_masks() -> dict[str, torch.Tensor]:
    # Block 0: q 4/16 pruned, up 16/32; block 1: q 8/16, up 0/32.
    return {
        "model.layers.0.self_attn.q_proj": _mask((4, 4), 4),
        "model.layers.0.mlp.up_proj": _mask((8, 4), 16),
        "model.layers.1.self_attn.q_proj": _mask((4, 4), 8),
        "model.layers.1.mlp.up_proj": _mask((8, 4), 0),
    }


def test_layer_sparsity_exact(llama_masks):
    stats = MaskAnalyzer.analyze_layer_sparsity(llama_masks)
    m = stats["per_matrix"]["model.layers.0.mlp.up_proj"]
    assert (m["sparsity"], m["pruned"], m["total"], m["shape"], m["block"], m["kind"]) == (0.5, 16, 32, [8, 4], 0, "up_proj")
    assert stats["per_matrix"]["model.layers.1.self_attn.q_proj"]["sparsity"] == 0.5
    # Aggregates pool elements: block 0 = (4 + 16) / (16 + 32).
    assert stats["per_block"][0] == {"pruned": 20, "total": 48, "matrices": 2, "sparsity": 20 / 48}
    assert stats["per_block"][1] == {"pruned": 8, "total": 48, "matrices": 2, "sparsity": 8 / 48}
    assert stats["per_kind"]["q_proj"] == {"pruned": 12, "total": 32, "matrices": 2, "sparsity": 12 / 32}
    assert stats["per_kind"]["up_proj"]["sparsity"] == 16 / 64
    assert stats["overall"] == {"pruned": 28, "total": 96, "matrices": 4, "sparsity": 28 / 96}
    json.dumps(stats)  # ready for atomic_write_json


def test_kinds_and_blocks_of_other_families():
    masks = {
        "transformer.h.0.attn.c_attn": _mask((6, 2), 3),
        "transformer.h.0.attn.c_proj": _mask((2, 2), 1),
        "transformer.h.0.mlp.c_proj": _mask((2, 8), 0),
        "gpt_neox.layers.1.mlp.dense_h_to_4h": _mask((8, 2), 8),
        "lm_head": _mask((4, 2), 2),
    }
    stats = MaskAnalyzer.analyze_layer_sparsity(masks)
    kinds = {n: m["kind"] for n, m in stats["per_matrix"].items()}
    # GPT-2 has two c_proj per block, so they keep their in-block path; unique names stay short.
    assert kinds == {"transformer.h.0.attn.c_attn": "c_attn", "transformer.h.0.attn.c_proj": "attn.c_proj",
                     "transformer.h.0.mlp.c_proj": "mlp.c_proj", "gpt_neox.layers.1.mlp.dense_h_to_4h": "dense_h_to_4h",
                     "lm_head": "lm_head"}
    assert stats["per_matrix"]["gpt_neox.layers.1.mlp.dense_h_to_4h"]["block"] == 1
    assert stats["per_matrix"]["lm_head"]["block"] is None
    assert set(stats["per_block"]) == {0, 1}  # lm_head only counts overall and per kind
    assert stats["overall"]["pruned"] == 14 and stats["overall"]["total"] == 56


def test_compare_identical_and_complementary(llama_masks):
    same = MaskAnalyzer.compare_domain_masks(llama_masks, {n: t.clone() for n, t in llama_masks.items()})
    for entry in (same["overall"], *same["per_matrix"].values()):
        assert entry["jaccard_pruned"] == entry["kept_overlap"] == entry["hamming_agreement"] == 1.0

    flipped = {n: ~t for n, t in llama_masks.items()}
    comp = MaskAnalyzer.compare_domain_masks(llama_masks, flipped)
    assert comp["overall"]["jaccard_pruned"] == 0.0
    assert comp["overall"]["kept_overlap"] == 0.0
    assert comp["overall"]["hamming_agreement"] == 0.0
    # up_proj of block 1 keeps everything in a and nothing in b: no kept weight in common.
    assert comp["per_matrix"]["model.layers.1.mlp.up_proj"]["kept_overlap"] == 0.0


def test_compare_partial_overlap_exact():
    a = {"m.layers.0.q": torch.tensor([[True, True, False, False]])}
    b = {"m.layers.0.q": torch.tensor([[True, False, False, True]])}
    r = MaskAnalyzer.compare_domain_masks(a, b)["overall"]
    # pruned a = {2, 3}, pruned b = {1, 2}: Jaccard 1/3; kept {0, 1} vs {0, 3}: overlap 1/2; agree on {0, 2}.
    assert r["jaccard_pruned"] == pytest.approx(1 / 3)
    assert r["kept_overlap"] == 0.5
    assert r["hamming_agreement"] == 0.5


def test_compare_rejects_mismatches(llama_masks):
    wrong_shape = dict(llama_masks, **{"model.layers.0.mlp.up_proj": _mask((4, 8), 0)})
    with pytest.raises(ValueError, match=r"shapes differ.*up_proj.*\(8, 4\) vs \(4, 8\)"):
        MaskAnalyzer.compare_domain_masks(llama_masks, wrong_shape)
    missing = {n: t for n, t in llama_masks.items() if "layers.1" not in n}
    with pytest.raises(ValueError, match=r"different matrices.*layers\.1"):
        MaskAnalyzer.compare_domain_masks(llama_masks, missing)


def test_uint8_and_path_inputs(llama_masks, tmp_path):
    path = save_tensors(tmp_path / "run" / "masks.safetensors", llama_masks)
    direct = MaskAnalyzer.analyze_layer_sparsity(llama_masks)
    assert MaskAnalyzer.analyze_layer_sparsity(path) == direct
    assert MaskAnalyzer.analyze_layer_sparsity(str(tmp_path / "run")) == direct  # a run folder
    as_uint8 = {n: t.to(torch.uint8) for n, t in llama_masks.items()}
    assert MaskAnalyzer.analyze_layer_sparsity(as_uint8) == direct
    assert MaskAnalyzer.compare_domain_masks(path, as_uint8)["overall"]["hamming_agreement"] == 1.0
    loaded = load_masks(path)
    assert all(loaded[n].dtype == torch.bool and torch.equal(loaded[n], llama_masks[n]) for n in llama_masks)


def test_load_masks_refuses_scores_and_non_binary():
    with pytest.raises(TypeError, match="scores are not masks"):
        load_masks({"a.0.q": torch.rand(2, 2)})
    with pytest.raises(ValueError, match="other than 0 and 1"):
        load_masks({"a.0.q": torch.tensor([[0, 2]], dtype=torch.uint8)})
    with pytest.raises(FileNotFoundError):
        load_masks("/nonexistent/masks.safetensors")


@pytest.fixture
def tracker() -> PerformanceTracker:
    t = PerformanceTracker()
    t.add_measurement(sparsity=0.3, perplexity=6.2, method="d_pruner", domain_ppl=5.1, seconds=12)
    t.add_measurement(sparsity=0.5, perplexity=8.0, method="d_pruner", domain_ppl=6.4)
    t.add_measurement(sparsity=0.5, perplexity=9.5, method="wanda", general_ppl=9.9)  # dominated by d_pruner 0.5
    t.add_measurement(sparsity=0.7, perplexity=30.0, method="wanda")
    t.add_measurement(sparsity=0.3, perplexity=6.0, method="sparsegpt")
    t.add_measurement(sparsity=0.2, perplexity=6.1, method="sparsegpt")  # dominated by sparsegpt 0.3
    return t


def test_add_measurement_validates():
    t = PerformanceTracker()
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            t.add_measurement(sparsity=bad, perplexity=5.0)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="perplexity"):
            t.add_measurement(sparsity=0.5, perplexity=bad)
    with pytest.raises(TypeError, match="note"):
        t.add_measurement(sparsity=0.5, perplexity=5.0, note=[1, 2])
    assert t.measurements == []


def test_pareto_frontier_overall_and_per_method(tracker):
    front = [(p["method"], p["sparsity"], p["perplexity"]) for p in tracker.get_pareto_frontier()]
    assert front == [("sparsegpt", 0.3, 6.0), ("d_pruner", 0.5, 8.0), ("wanda", 0.7, 30.0)]
    wanda = [(p["sparsity"], p["perplexity"]) for p in tracker.get_pareto_frontier("wanda")]
    assert wanda == [(0.5, 9.5), (0.7, 30.0)]
    assert [p["sparsity"] for p in tracker.get_pareto_frontier("sparsegpt")] == [0.3]
    assert tracker.get_pareto_frontier("absent") == []
    tracker.get_pareto_frontier()[0]["sparsity"] = 0.99  # returned copies: the tracker is untouched
    assert tracker.measurements[4]["sparsity"] == 0.3


def test_csv_round_trip(tracker, tmp_path):
    path = tracker.export_metrics(tmp_path / "out" / "performance_data.csv")
    header = path.read_text().splitlines()[0]
    assert header == "method,sparsity,perplexity,domain_ppl,general_ppl,seconds"
    back = PerformanceTracker.from_csv(path)
    assert back.measurements == tracker.measurements
    assert isinstance(back.measurements[0]["seconds"], int)
    assert back.get_pareto_frontier() == tracker.get_pareto_frontier()
    odd = PerformanceTracker()
    odd.add_measurement(0.9, float("inf"), method="1", note="collapsed")  # numeric-looking name, inf ppl
    assert PerformanceTracker.from_csv(odd.export_metrics(tmp_path / "odd.csv")).measurements == odd.measurements
    as_json = tracker.export_metrics(tmp_path / "performance_data.json")
    assert json.loads(as_json.read_text()) == tracker.measurements


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # no temp file left


def test_plots_write_png(llama_masks, tracker, tmp_path):
    pytest.importorskip("matplotlib")
    _assert_png(MaskAnalyzer.visualize_mask_distribution(llama_masks, tmp_path / "sparsity_plot.png"))
    _assert_png(MaskAnalyzer.visualize_mask_distribution({"lm_head": _mask((4, 4), 3)}, tmp_path / "noblocks.png"))
    _assert_png(tracker.plot_performance_curves(tmp_path / "performance_plot.png"))
    _assert_png(tracker.plot_performance_curves(tmp_path / "domain.png", metric="domain_ppl"))
    with pytest.raises(ValueError, match="no measurement"):
        tracker.plot_performance_curves(tmp_path / "x.png", metric="absent")


def test_plots_without_matplotlib_name_the_extra(llama_masks, tracker, tmp_path, monkeypatch):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # makes ``import mod`` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "dpruner-lightning\[plot\]"'):
        MaskAnalyzer.visualize_mask_distribution(llama_masks, tmp_path / "a.png")
    with pytest.raises(ImportError, match=r"dpruner-lightning\[plot\]"):
        tracker.plot_performance_curves(tmp_path / "b.png")
    assert not (tmp_path / "a.png").exists()
