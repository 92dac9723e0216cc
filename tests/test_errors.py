"""Bad input gets a clear error that names the problem, before any calibration pass runs."""

from __future__ import annotations

import pytest
import torch

from dpruner_lightning.config import MaskSpec, ModelSpec, TargetSpec
from dpruner_lightning.data import TextSource
from dpruner_lightning.export import export_hf_folder
from dpruner_lightning.methods import DPrunerMethod
from dpruner_lightning.module import DPrunerModule

from .conftest import tiny_model
from .helpers import run_prune, tiny_spec


def test_missing_model_folder():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DPrunerModule(model=ModelSpec(name_or_path="./no/such/model"))


def test_unknown_random_model_type():
    with pytest.raises(ValueError, match="unknown model type 'notamodel'"):
        DPrunerModule(model=ModelSpec(name_or_path="random:notamodel"))


def test_unreachable_hub_model_names_the_fix(monkeypatch):
    import huggingface_hub.constants

    # Offline mode is read at import time: patch the constant so no network retry is attempted.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from dpruner_lightning.models import load_tokenizer

    with pytest.raises(OSError, match="could not load the tokenizer of 'nobody-org/no-such-model-xyz'"):
        load_tokenizer(ModelSpec(name_or_path="nobody-org/no-such-model-xyz"))


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 2.0])
def test_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        MaskSpec(sparsity=sparsity)


@pytest.mark.parametrize("pattern", ["4:2", "0:4", "2:4:8", "two:four"])
def test_bad_nm_pattern(pattern):
    with pytest.raises(ValueError, match="N:M|granularity"):
        MaskSpec(granularity=pattern)


@pytest.mark.parametrize("kwargs", [dict(lambda_reg=-0.1), dict(alpha=-1e-4)])
def test_negative_lambda_or_alpha(kwargs):
    with pytest.raises(ValueError, match="must be >= 0"):
        DPrunerMethod(**kwargs)


def test_target_regex_matching_nothing(tmp_path):
    module = DPrunerModule(model=tiny_spec(), targets=TargetSpec(target_modules=r".*\.no_such_layer"))
    with pytest.raises(ValueError, match="matches no linear layer"):
        module.configure_model()


def test_target_regex_matching_nothing_fails_before_any_pass(tmp_path, monkeypatch):
    import lightning as L

    from .helpers import smoke_data

    calls = []
    monkeypatch.setattr(DPrunerMethod, "start_pass", lambda self, p: calls.append(p))
    module = DPrunerModule(model=tiny_spec(), targets=TargetSpec(target_modules="lm_head_only_please"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        **module.trainer_kwargs(), default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="matches no linear layer"):
        trainer.fit(module, smoke_data())
    assert calls == []


def test_empty_calibration_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    from dpruner_lightning.data import load_documents

    with pytest.raises(ValueError, match="is empty"):
        load_documents(TextSource(path=str(empty)))


def test_too_short_calibration_text(tmp_path):
    with pytest.raises(ValueError, match="too short.*num_samples=500"):
        run_prune(tmp_path, num_samples=500, validate=False)


def test_missing_text_file():
    from dpruner_lightning.data import load_documents

    with pytest.raises(FileNotFoundError, match="no text file found"):
        load_documents(TextSource(path="/no/such/file.jsonl"))


def test_text_source_needs_exactly_one_origin():
    with pytest.raises(ValueError, match="exactly one of path, dataset, sample or texts"):
        TextSource(path="a.txt", sample="pubmed")


def test_failed_export_keeps_the_earlier_folder(tmp_path):
    model = tiny_model("llama")
    folder = export_hf_folder(model, None, tmp_path / "pruned_model")
    before = sorted(p.name for p in folder.iterdir())

    class Broken(torch.nn.Module):
        def save_pretrained(self, path):
            (path / "partial.bin").write_bytes(b"x")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        export_hf_folder(Broken(), None, folder)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["pruned_model"]  # no temp folder left behind


def test_unreachable_hub_dataset_falls_back_to_the_sample_or_says_what_to_do(monkeypatch, caplog):
    import datasets

    from dpruner_lightning.data import load_documents

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("dpruner_lightning.assets.sample_corpus", lambda name: [f"{name} document"])
    with caplog.at_level("WARNING"):
        docs = load_documents(TextSource(dataset="org/data", fallback_sample="pubmed"))
    assert docs == ["pubmed document"] and "using the built-in 'pubmed' sample" in caplog.text
    with pytest.raises(RuntimeError, match=r"(?s)could not load dataset org/data.*Without hub access"):
        load_documents(TextSource(dataset="org/data"))
