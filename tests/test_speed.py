"""Speed measurement (dpruner_lightning.speed): exactness of the sparse linear, the report's shape, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from dpruner_lightning.export import to_semi_structured
from dpruner_lightning.speed import SparseLinear, linear_flops, linear_timings, measure_speed
from dpruner_lightning.speed_report import format_speed_report, run_speed

from .conftest import TINY, tiny_model

FAST = dict(prefill_lengths=(16,), decode_context=8, repeats=2, warmup=1)


def _half_zero(model: nn.Module) -> nn.Module:
    """Zero every other input column of each decoder linear (50% zeros, also a valid 2:4 pattern)."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and ".layers." in name:
                m.weight[:, 1::2] = 0
    return model


def test_sparse_linear_matches_dense() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < 0.5] = 0
    sparse = SparseLinear(lin)
    x = torch.randn(3, 5, 64)
    assert sparse.layout == "csr" and abs(sparse.density - 0.5) < 0.1
    assert torch.allclose(sparse(x), lin(x), atol=1e-5, rtol=0)


def test_measure_speed_dense_and_csr() -> None:
    model = _half_zero(tiny_model("llama"))
    result = measure_speed(model, 257, backends=("dense", "csr", "semi_structured"), **FAST)
    rows = {(r["backend"], r["phase"]): r for r in result["rows"]}
    for backend in ("dense", "csr"):
        for phase in ("prefill", "decode"):
            row = rows[(backend, phase)]
            assert row["status"] == "ok", row
            assert row["median_s"] > 0 and math.isfinite(row["median_s"]) and math.isfinite(row["tokens_per_s"])
            assert row["peak_memory_bytes"] >= 0
        assert rows[(backend, "prefill")]["output_shape"] == rows[("dense", "prefill")]["output_shape"]
    assert rows[("csr", "prefill")]["max_abs_diff_vs_dense"] < 1e-4
    assert rows[("semi_structured", "-")]["status"].startswith("unavailable: ")
    assert "CUDA" in rows[("semi_structured", "-")]["status"]
    # the model is left as it was: no SparseLinear stays behind
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    report = format_speed_report(result)
    assert "| csr | prefill | 16 |" in report and "torch" in report


def test_to_semi_structured_raises_on_cpu() -> None:
    """The export entry point (also importable from speed, where it lived) refuses a CPU model, naming the need."""
    from dpruner_lightning import speed

    assert speed.to_semi_structured is to_semi_structured
    model = _half_zero(tiny_model("llama", dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"CUDA GPU of compute capability >= 8\.0"):
        to_semi_structured(model)


def test_linear_flops_and_timings() -> None:
    assert linear_flops(tokens=3, in_features=4, out_features=5) == 120.0  # 2 * 3 * 4 * 5
    assert linear_flops(3, 4, 5, density=0.25) == 30.0
    model = _half_zero(tiny_model("llama"))
    result = linear_timings(model, tokens=8, repeats=2, warmup=0)
    csr = [r for r in result["rows"] if r["backend"] == "csr"]
    assert {tuple(r["shape"]) for r in csr} == {(64, 64), (32, 64), (128, 64), (64, 128)}
    for r in csr:
        out_f, in_f = r["shape"]
        assert r["flops"] == pytest.approx(2 * 8 * in_f * out_f * r["density"])
        assert r["speed_vs_dense"] > 0
    assert all(r["status"].startswith("unavailable") for r in result["rows"] if r["backend"] == "semi_structured")
    text = format_speed_report({"linear": result, "hardware": result["hardware"]})
    assert "slower" in text or "faster" in text or "same" in text


def test_run_speed_writes_json(tmp_path, capsys) -> None:
    out = tmp_path / "speed.json"
    result = run_speed(["--model", "random:llama", "--config-overrides", json.dumps(TINY["llama"]),
                        "--compare", "random:llama", "--prefill", "16", "--decode-context", "8",
                        "--repeats", "2", "--warmup", "0", "--linear-tokens", "4", "--output", str(out)])
    data = json.loads(out.read_text())
    assert set(data) >= {"hardware", "runs", "comparison", "linear"}
    assert len(data["runs"]) == 2 and data["runs"][1]["rows"][0]["backend"] == "dense"
    assert {"prefill_lengths", "decode_context", "repeats", "memory"} <= set(data["runs"][1]["protocol"])
    assert {c["phase"] for c in data["comparison"]} == {"prefill", "decode"}
    assert data["comparison"][0]["speed_vs_reference"] > 0
    assert result["hardware"]["torch"] == torch.__version__
    assert "| backend | phase |" in capsys.readouterr().out


def test_run_speed_measures_several_models_against_one_reference(capsys) -> None:
    result = run_speed(["--model", "random:llama", "random:llama", "--compare", "random:llama", "--backends", "dense",
                        "--config-overrides", json.dumps(TINY["llama"]), "--prefill", "16", "--decode-context", "8",
                        "--repeats", "2", "--warmup", "0", "--linear-tokens", "0"])
    assert [r["label"] for r in result["runs"]] == ["reference random:llama", "random:llama", "random:llama"]
    assert len(result["comparison"]) == 4  # 2 models x (prefill 16, decode)
    assert all(c["model"] == "random:llama" and c["speed_vs_reference"] > 0 for c in result["comparison"])
    assert "| model | backend | phase |" in capsys.readouterr().out


def test_interleaved_timings_give_per_repeat_ratios(capsys) -> None:
    args = ["--model", "random:llama", "random:llama", "--compare", "random:llama", "--backends", "dense",
            "--config-overrides", json.dumps(TINY["llama"]), "--prefill", "16", "--decode-context", "8",
            "--repeats", "3", "--warmup", "0", "--interleave"]
    result = run_speed(args)
    rows = {(r["model"], r["phase"]): r for r in result["rows"]}
    assert set(rows) == {(m, p) for m in ("reference random:llama", "random:llama", "random:llama (3)")
                         for p in ("prefill", "decode")}
    for (model, _), r in rows.items():
        if model.startswith("reference"):  # reference[r] / reference[r]: exactly 1 in every repeat
            assert r["speed_vs_reference"] == r["ratio_min"] == r["ratio_max"] == 1.0
        assert r["ratio_min"] <= r["speed_vs_reference"] <= r["ratio_max"] and r["median_s"] > 0
    assert "| model | phase | tokens | median ms |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--backends dense"):
        run_speed([a for a in args if a not in ("--backends", "dense")])


def test_run_speed_takes_a_run_folder_and_our_sparse_checkpoint(tmp_path) -> None:
    from dpruner_lightning.algorithms.targets import find_targets
    from dpruner_lightning.export import export_hf_folder, save_sparse_model
    from dpruner_lightning.models import byte_tokenizer

    model, tok = tiny_model("llama"), byte_tokenizer()
    export_hf_folder(model, tok, tmp_path / "run" / "pruned_model")
    save_sparse_model(model, list(find_targets(model)), tok, tmp_path / "sparse")
    result = run_speed(["--model", str(tmp_path / "sparse"), "--compare", str(tmp_path / "run"), "--backends", "dense",
                        "--prefill", "8", "--decode-context", "4", "--repeats", "1", "--warmup", "0", "--linear-tokens", "0"])
    assert [r["label"] for r in result["runs"]] == [f"reference {tmp_path / 'run'}", str(tmp_path / "sparse")]
    with pytest.raises(FileNotFoundError, match="holds no model"):
        run_speed(["--model", str(tmp_path), "--backends", "dense"])  # neither a model nor a run folder
