"""Faults never pass silently: NaN / inf stop the run with the matrix and the likely setting named,
nothing non-finite is exported, and a killed export leaves the earlier one intact."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import lightning as L
import pytest
import torch

from dpruner_lightning.callbacks import add_histogram
from dpruner_lightning.config import MaskSpec, OutputSpec
from dpruner_lightning.export import NonFiniteError, export_hf_folder
from dpruner_lightning.methods import DPrunerMethod
from dpruner_lightning.module import DPrunerModule
from dpruner_lightning.quiet import install_known_filters

from .conftest import REPO, tiny_model
from .helpers import run_prune, smoke_data, tiny_spec

DIVERGING = ["--model.method.init_args.alpha", "10", "--model.method.init_args.update", "sgd",
             "--model.method.init_args.lambda_reg", "1e6", "--model.method.init_args.keep_updated_weights", "true"]


def test_diverging_sgd_run_fails_clearly_and_exports_nothing(tmp_path):
    # The reported case: it used to exit 0 with weights up to 3e27 and a pruned perplexity of 1.000.
    cmd = [sys.executable, "-m", "dpruner_lightning.cli", "fit", "--config", "configs/smoke.yaml",
           "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), *DIVERGING]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1  # a failure during the run, reported in one line
    assert "dpruner: failed: perplexity" in proc.stderr and "is not finite" in proc.stderr, proc.stderr[-3000:]
    assert "use update='proximal' or a smaller alpha" in proc.stderr
    assert not list(tmp_path.rglob("pruned_model")) and not list(tmp_path.rglob("sparse_model"))
    summary = tmp_path / "summary.json"
    recorded = json.loads(summary.read_text())  # the failure is recorded, with no non-dense perplexity
    assert recorded["status"] == "failed" and "NonFiniteError" in recorded["error"]
    assert set(recorded.get("perplexity", {})) <= {"dense"}


def test_diverging_pass_is_stopped_when_it_ends_naming_the_matrix(tmp_path):
    # No validation during fit (as in the Python API): the check at the end of the dual pass fires.
    install_known_filters()
    method = DPrunerMethod(alpha=10, update="sgd", lambda_reg=1e6, keep_updated_weights=True)
    module = DPrunerModule(model=tiny_spec(), method=method, mask=MaskSpec(sparsity=0.5), output=OutputSpec())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **module.trainer_kwargs(), limit_val_batches=0, default_root_dir=str(tmp_path))
    with pytest.raises(NonFiniteError, match=r"after pass 'dual': 'model\.layers\.0\..*' has \d+ of \d+ entries NaN or inf"
                                             r".*alpha / lambda_reg too large for update='sgd'"):
        trainer.fit(module, smoke_data())
    assert not module.pruned and not (tmp_path / "pruned_model").exists()


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_logit_fails_the_validation(tmp_path, value):
    module = run_prune(tmp_path, validate=False)
    calls = []

    def poison_first_batch(mod, args, output):  # one bad logit in one batch, as a numerical fault would give
        calls.append(1)
        if len(calls) == 1:
            output = output.clone()
            output[0, 3, 7] = value
        return output

    module.model.lm_head.register_forward_hook(poison_first_batch)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    with pytest.raises(NonFiniteError, match=r"perplexity on eval set 'domain' at stage 'pruned' is not finite"):
        trainer.validate(module, smoke_data(), verbose=False)
    assert "pruned" not in module.perplexities  # never recorded as a number


def test_a_non_finite_weight_is_named_by_the_validation(tmp_path):
    module = run_prune(tmp_path, validate=False)
    with torch.no_grad():
        module.model.model.layers[1].mlp.down_proj.weight[2, 5] = math.inf
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    with pytest.raises(NonFiniteError, match=r"'model\.layers\.1\.mlp\.down_proj' has 1 of 8192 entries NaN or inf"):
        trainer.validate(module, smoke_data(), verbose=False)


def test_non_finite_weights_are_never_exported(tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan
    with pytest.raises(NonFiniteError, match=r"refusing to export the model: 'model\.norm\.weight' has 1 of 64"):
        export_hf_folder(model, None, tmp_path / "pruned_model")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temp folder


class RecordingWriter:
    def __init__(self, fail: bool = False) -> None:
        self.tags, self.fail = [], fail

    def add_histogram(self, tag, values, step):
        if self.fail:
            raise ValueError("The histogram is empty, please file a bug report.")
        self.tags.append(tag)


def test_histograms_of_empty_or_non_finite_tensors_are_skipped_with_a_warning(caplog):
    writer = RecordingWriter()
    with caplog.at_level("WARNING"):
        add_histogram(writer, "ok", torch.randn(10), 100, 0, 0)
        add_histogram(writer, "empty", torch.empty(0), 100, 0, 0)
        add_histogram(writer, "nan", torch.tensor([1.0, math.nan]), 100, 0, 0)
        add_histogram(writer, "inf", torch.tensor([1.0, -math.inf]), 100, 0, 0)
        add_histogram(RecordingWriter(fail=True), "extreme", torch.tensor([3e38, -3e38]), 100, 0, 0)
    assert writer.tags == ["ok"]
    for tag in ("empty", "nan", "inf", "extreme"):
        assert f"histogram {tag} skipped" in caplog.text


KILLED_MID_EXPORT = """
import os, signal, sys
from dpruner_lightning.export import artifact_folder
with artifact_folder(sys.argv[1], "pruned_model") as tmp:
    (tmp / "config.json").write_text("{}")
    (tmp / "model.safetensors").write_bytes(b"half a model")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_an_export_killed_mid_write_keeps_the_earlier_one_and_is_cleaned_next_time(tmp_path):
    folder = export_hf_folder(tiny_model("llama"), None, tmp_path / "pruned_model")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_EXPORT, str(folder)], cwd=REPO, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    orphans = [p for p in tmp_path.iterdir() if p.name.startswith(".dpruner-tmp.")]
    assert len(orphans) == 1  # the killed process's temp folder, never visible as pruned_model/
    export_hf_folder(tiny_model("llama", seed=1), None, folder)  # the next save cleans it up
    assert [p.name for p in tmp_path.iterdir()] == ["pruned_model"]
