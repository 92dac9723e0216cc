"""The pruning core without Lightning, and the package's layering."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.config import MaskSpec, OutputSpec
from dpruner_lightning.export import load_tensors
from dpruner_lightning.methods import DPrunerMethod, WandaMethod
from dpruner_lightning.pruning import DenseReference, calibrate, check_mask_shapes, prune, save_artifacts

from .conftest import tiny_model
from .helpers import mask_hash, run_prune, token_batches


def _batches(seed: int, n: int = 3) -> list[torch.Tensor]:
    return token_batches(seed, n)


def _core_prune(method, spec=MaskSpec(sparsity=0.5)):
    model = tiny_model("llama")
    targets = find_targets(model)
    dense = DenseReference.of(model, targets)
    method.prepare(model, targets)
    seconds = calibrate(model, targets, method, {"general": _batches(0), "domain": _batches(1)})
    return model, targets, prune(model, targets, method, spec, dense, weights_changed=True), seconds


def test_the_core_prunes_with_no_trainer_and_reports_what_it_did(tmp_path):
    method = DPrunerMethod(alpha=1e-3, lambda_reg=0.1)
    model, targets, result, seconds = _core_prune(method)
    assert set(seconds) == {"general", "dual"} and all(s > 0 for s in seconds.values())
    assert result.method == "d_pruner" and result.granularity == "layer" and result.sparsity_target == 0.5
    assert set(result.masks) == set(targets) == set(result.per_matrix)
    for name, keep in result.masks.items():  # every pruned weight is zero, the realised sparsity is the request
        assert not targets[name].weight_view()[~keep].any()
        assert result.per_matrix[name] == pytest.approx(0.5, abs=1e-3)
    assert result.sparsity_realised["targets"] == pytest.approx(0.5, abs=1e-3)
    assert result.parameters["targets_dense"] == sum(t.numel() for t in targets.values())
    assert not any(t.weight.requires_grad for t in targets.values())  # calibrate leaves no grad switched on
    summary = result.summary()
    assert "masks" not in summary and json.loads(json.dumps(summary))["method_repr"].startswith("DPrunerMethod(")
    written = save_artifacts(tmp_path, result, model, None, method, OutputSpec(export_model=False))
    assert set(written) == {"general_importance", "dual_importance", "masks"}
    saved = load_tensors(written["masks"])
    assert all(torch.equal(saved[n].bool(), k) for n, k in result.masks.items())
    torch.testing.assert_close(load_tensors(written["dual_importance"]), method.dual)


def test_the_core_gives_the_masks_the_lightning_run_gives(tmp_path):
    """Same batches through Trainer.fit and through calibrate(): the same masks."""
    import lightning as L

    from dpruner_lightning.data import CalibrationDataModule
    from dpruner_lightning.module import DPrunerModule

    from .helpers import tiny_spec

    general, domain = torch.cat(_batches(0)), torch.cat(_batches(1))
    dm = CalibrationDataModule.from_token_blocks(general, domain, general[:2], domain[:2], batch_size=2)
    module = DPrunerModule(model=tiny_spec(), method=DPrunerMethod(alpha=1e-3, lambda_reg=0.1),
                           output=OutputSpec(export_model=False, save_importance=False, save_masks=False))
    trainer = L.Trainer(**module.trainer_kwargs(), accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, dm)

    model = tiny_model("llama")  # tiny_spec builds the same random model (seed 0)
    targets = find_targets(model)
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], module.model.state_dict()["lm_head.weight"])
    method = DPrunerMethod(alpha=1e-3, lambda_reg=0.1)
    method.prepare(model, targets)
    calibrate(model, targets, method, {"general": list(general.split(2)), "domain": list(domain.split(2))})
    result = prune(model, targets, method, MaskSpec(sparsity=0.5), DenseReference.of(model, targets))
    assert mask_hash(result.masks) == mask_hash(module.result.masks)


def test_an_n_m_pattern_the_shapes_cannot_hold_is_refused_before_any_pass(tmp_path):
    model = tiny_model("llama")
    targets = find_targets(model)  # in_features 64 and 128
    with pytest.raises(ValueError, match=r"3:5 needs every target's in_features divisible by 5.*in_features 64"):
        check_mask_shapes(targets, MaskSpec(granularity="3:5"), WandaMethod())
    check_mask_shapes(targets, MaskSpec(granularity="2:4"), WandaMethod())  # divisible: accepted
    calls = []
    with pytest.raises(ValueError, match="divisible by 5"):
        run_prune(tmp_path, method=_Recording(calls), mask=MaskSpec(granularity="3:5"))
    assert calls == []  # no pass started


class _Recording(WandaMethod):
    def __init__(self, calls):
        super().__init__()
        self._calls = calls

    def start_pass(self, p):
        self._calls.append(p)
        super().start_pass(p)


LIBRARY = ["algorithms.masks", "methods", "config", "data", "models", "pruning", "module", "callbacks", "export",
           "evaluation", "tasks", "analysis", "api", "comparison", "comparison_report", "benchmark", "memory", "rundir"]


def test_library_layers_never_import_the_command_line():
    """Each module alone in a fresh interpreter: the CLI entry point is never pulled in by the library."""
    code = ("import importlib, sys\n"
            f"for name in {LIBRARY!r}:\n"
            "    for m in [k for k in sys.modules if k.startswith('dpruner_lightning')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module('dpruner_lightning.' + name)\n"
            "    assert 'dpruner_lightning.cli' not in sys.modules, name\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_no_import_cycles_between_package_modules():
    """Static graph of `from .x import` edges inside the package has no cycle."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "dpruner_lightning"
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        mod = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                if node.module:
                    edges.add(f"{base}.{node.module}")
                else:  # from . import models
                    edges.update(f"{base}.{a.name}" for a in node.names)
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in seen or m not in graph:
            return
        stack.append(m)
        for n in graph[m]:
            visit(n)
        stack.pop()
        seen.add(m)

    for m in sorted(graph):
        if not m.endswith("__init__") and m != "dpruner_lightning":
            visit(m)


def test_a_missing_gradient_is_an_error_not_the_weight():
    for family in ("llama", "gpt2"):  # nn.Linear and GPT-2's transposed Conv1D
        target = next(iter(find_targets(tiny_model(family)).values()))
        with pytest.raises(RuntimeError, match="has no gradient"):
            target.grad_view()
        target.weight.grad = torch.ones_like(target.weight)
        assert target.grad_view().shape == target.weight_view().shape
