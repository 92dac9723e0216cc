"""benchmarks/scale.py runs end to end on a tiny shape and prints the lines the README quotes."""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from .conftest import REPO


def _scale(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the benchmarks import their shared sibling module
    return importlib.import_module("scale")


def test_scale_benchmark_prints_ratios_mask_seconds_and_peak_against_the_estimate(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing may be written where it runs
    scale = _scale(monkeypatch)
    result = scale.main(["--shape", "tiny", "--tokens", "4", "--seq-len", "32", "--repeats", "1"])
    out = capsys.readouterr().out
    ratios = dict(re.findall(r"^ratio (\w+) (\S+)$", out, re.M))
    assert set(ratios) == {"general", "dual"}  # D-PRUNER's two passes
    for name, value in ratios.items():
        assert math.isfinite(float(value)) and float(value) > 0, name
        assert float(value) == round(result["ratio"][name], 2)
    steps = dict(re.findall(r"^step_ratio (\w+) (\S+)  ", out, re.M))
    assert {name: float(v) for name, v in steps.items()} == {name: round(v, 2) for name, v in result["step_ratio"].items()}
    assert set(steps) == {"general", "dual"} and all(float(v) > 0 for v in steps.values())
    assert re.search(r"^mask_seconds \d+\.\d\d$", out, re.M)
    peak, estimate = map(float, re.search(r"^peak (\S+) estimate (\S+)$", out, re.M).groups())
    assert math.isfinite(peak) and math.isfinite(estimate) and peak > 0 and estimate > 0
    for name in ("general", "dual"):
        ours, bare = map(float, re.search(rf"^tokens_per_s {name} ours (\S+) bare (\S+)", out, re.M).groups())
        assert ours > 0 and bare > 0
    assert list(tmp_path.iterdir()) == []


def test_scale_shapes_have_their_published_sizes(monkeypatch):
    scale = _scale(monkeypatch)

    def params(shape: str) -> int:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **scale.SHAPES[shape]))
        return sum(p.numel() for p in model.parameters())

    assert 100e6 <= params("llama-100m") <= 120e6
    assert 6.6e9 <= params("llama-2-7b") <= 6.8e9  # 6.74B
    assert 7.9e9 <= params("llama-3-8b") <= 8.1e9  # 8.03B


def test_the_prepared_gpu_run_passes_arguments_the_benchmark_accepts(monkeypatch):
    """benchmarks/gpu_checks.sh waits for a session lent a GPU: its scale.py calls must still parse (on
    the CPU, with its dry-run substitutions for the shape, the device and the sequence length)."""
    import shlex

    scale = _scale(monkeypatch)
    script = (REPO / "benchmarks" / "gpu_checks.sh").read_text()
    assert "SHAPE=${SHAPE:-llama-2-7b}" in script and "DEVICE=${DEVICE:-cuda}" in script
    calls = re.findall(r"benchmarks/scale\.py ([^\n]*)", script.replace("\\\n", " "))
    assert len(calls) == 2
    for call in calls:
        argv = shlex.split(call.replace('"$SHAPE"', "tiny").replace('"$DEVICE"', "cpu").replace('"$SEQ"', "64"))
        args = scale.parse_args(argv)
        assert (args.shape, args.device, args.seq_len, args.checkpointing) == ("tiny", "cpu", 64, True)


def test_allocation_warmup_benchmark_prints_its_two_ratios(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    _scale(monkeypatch)  # puts benchmarks/ on the path
    warmup = importlib.import_module("allocation_warmup")
    result = warmup.main(["--shape", "tiny", "--seq-len", "16", "--before", "3", "--after", "4"])
    out = capsys.readouterr().out
    assert len(re.findall(r"^step \d+ \d+\.\d+ s, \d+ minor faults$", out, re.M)) == 7
    assert re.search(r"^allocated \d+\.\d\d GiB of state$", out, re.M)
    for name in ("slowdown", "steady"):
        assert float(re.search(rf"^{name} (\S+)$", out, re.M).group(1)) == round(result[name], 2) > 0
    with pytest.raises(SystemExit):
        warmup.main(["--after", "2"])
    assert list(tmp_path.iterdir()) == []
