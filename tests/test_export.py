"""Our sparse format (bitmask + kept values, exact round trip, its size) and export folders that never
replace what this package did not write."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from dpruner_lightning.algorithms.masks import apply_mask_, select_mask
from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.export import (
    MANIFEST,
    SPARSE_FILE,
    export_hf_folder,
    load_sparse_model,
    pack_sparse,
    save_sparse_model,
    unpack_sparse,
)
from dpruner_lightning.pruning import PruneResult

from .conftest import TINY, tiny_model


def test_pack_unpack_is_exact():
    torch.manual_seed(0)
    w = torch.randn(7, 13).to(torch.bfloat16)
    w[w.abs() < 0.5] = 0
    packed = pack_sparse(w)
    assert packed["bits"].dtype == torch.uint8 and packed["bits"].numel() == -(-w.numel() // 8)
    assert packed["values"].numel() == int((w != 0).sum())
    assert torch.equal(unpack_sparse(packed["bits"], packed["values"], packed["shape"]), w)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sparse_model_round_trip_and_size(tmp_path, family):
    model = tiny_model(family, dtype=torch.bfloat16)
    targets = find_targets(model)
    for t in targets.values():
        apply_mask_(t.weight_view(), select_mask(t.weight_view().float().abs(), 0.5))
    folder = save_sparse_model(model, list(targets), None, tmp_path / "sparse")
    reloaded = load_sparse_model(folder, dtype=torch.bfloat16)
    ids = torch.randint(0, 257, (2, 16))
    assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    # Bytes: targets cost 1/16 (bits) + 1/2 (values) of dense bf16; the rest stays dense.
    target_dense = sum(t.weight.numel() for t in targets.values()) * 2
    other = sum(p.numel() for n, p in model.named_parameters() if n[:-len(".weight")] not in targets) * 2
    expected = target_dense * (1 / 16 + 1 / 2) + other
    assert (folder / SPARSE_FILE).stat().st_size == pytest.approx(expected, rel=0.05)


# -- saving never deletes what it did not write ---------------------------------------------------

@pytest.fixture
def pruner(tmp_path):
    """A DPruner whose (tiny, random) model counts as pruned: enough to exercise save_pruned_model."""
    from dpruner_lightning import DPruner, DPrunerConfig

    cfg = DPrunerConfig(model_name="random:llama", tokenizer="bytes", model_overrides=TINY["llama"], device="cpu")
    p = DPruner(config=cfg, output_dir=str(tmp_path / "runs"))
    p.module.configure_model()
    masks = {n: torch.ones(t.shape, dtype=torch.bool) for n, t in p.module.targets.items()}
    p.module.result = PruneResult(method="d_pruner", method_repr="test", granularity="layer", allocation="uniform",
                                  sparsity_target=0.0, sparsity_realised={"targets": 0.0, "all_parameters": 0.0},
                                  per_matrix={n: 0.0 for n in masks}, parameters={}, masks=masks)
    return p


def _tree(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _kind(folder) -> str:
    return json.loads((folder / MANIFEST).read_text())["kind"]


def _names(parent) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != "runs")  # runs/: the DPruner's log folder


def _no_temp_folders(parent) -> bool:
    return not [p.name for p in parent.iterdir() if p.name.startswith(".dpruner-")]


@pytest.mark.parametrize("via_cwd", [False, True])
def test_saving_into_a_folder_of_user_files_is_refused_and_keeps_them(pruner, tmp_path, monkeypatch, via_cwd):
    work = tmp_path / "experiments"
    (work / "run1").mkdir(parents=True)
    (work / "notes.md").write_text("my notes")
    (work / "run1" / "results.csv").write_text("a,b\n1,2\n")
    before = _tree(work)
    if via_cwd:  # the reported case: save_pruned_model(os.getcwd()) inside an experiments folder
        monkeypatch.chdir(work)
    with pytest.raises(FileExistsError, match=r"(?s)experiments is not empty.*notes.md.*remove it yourself"):
        pruner.save_pruned_model(os.getcwd() if via_cwd else str(work))
    assert _tree(work) == before
    assert _no_temp_folders(tmp_path)


def test_saving_onto_a_file_is_refused(pruner, tmp_path):
    target = tmp_path / "model.bin"
    target.write_text("not yours")
    with pytest.raises(FileExistsError, match=r"model.bin exists and is not a folder.*remove it yourself"):
        pruner.save_pruned_model(str(target))
    assert target.read_text() == "not yours"
    assert _names(tmp_path) == ["model.bin"]  # no hidden .model.bin.old


def test_saving_into_an_empty_or_our_own_folder_replaces_it(pruner, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pruned"
    folder.mkdir()  # empty: fine
    pruner.save_pruned_model(str(folder))
    files = set(_tree(folder))
    assert {MANIFEST, "config.json", "masks.safetensors", "dpruner_summary.json"} <= files
    with torch.no_grad():
        pruner.model.model.layers[0].mlp.up_proj.weight.zero_()
    pruner.save_pruned_model(str(folder))  # ours: replaced by the new export, nothing else left over
    assert set(_tree(folder)) == files and _no_temp_folders(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert int(torch.count_nonzero(reloaded.model.layers[0].mlp.up_proj.weight)) == 0
    (folder / "my_eval.txt").write_text("added by hand")  # now it also holds a user file: refused
    with pytest.raises(FileExistsError, match="my_eval.txt"):
        pruner.save_pruned_model(str(folder))
    assert (folder / "my_eval.txt").read_text() == "added by hand"


def test_exported_files_are_readable_as_plainly_written_files_are(tmp_path):
    """Temp files and folders are private (0600 / 0700): an export takes the modes the umask gives a plain
    file, so a server running as another user can read it."""
    from dpruner_lightning.export import DIR_MODE, FILE_MODE, atomic_write_json

    umask = os.umask(0o022)
    os.umask(umask)
    assert (FILE_MODE, DIR_MODE) == (0o666 & ~umask, 0o777 & ~umask)  # the process's umask, as open() applies it
    assert FILE_MODE & 0o044  # group / others can read (the usual 022 umask)
    folder = export_hf_folder(tiny_model("llama"), None, tmp_path / "hf")
    assert folder.stat().st_mode & 0o777 == DIR_MODE
    assert {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()} == {p.name: FILE_MODE for p in folder.iterdir()}
    assert atomic_write_json(tmp_path / "a.json", {}).stat().st_mode & 0o777 == FILE_MODE


def test_a_failure_mid_write_keeps_the_earlier_export(pruner, tmp_path, monkeypatch):
    folder = tmp_path / "pruned"
    pruner.save_pruned_model(str(folder))
    before = _tree(folder)

    def disk_full(path, *args, **kwargs):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("dpruner_lightning.api.save_tensors", disk_full)
    with pytest.raises(OSError, match="disk full"):
        pruner.save_pruned_model(str(folder))
    assert _tree(folder) == before
    assert _names(tmp_path) == ["pruned"]  # no temp folder left behind


def test_sparse_export_refuses_a_foreign_folder_and_replaces_its_own(tmp_path):
    model = tiny_model("llama")
    targets = list(find_targets(model))
    foreign = tmp_path / "sparse"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="keep.txt"):
        save_sparse_model(model, targets, None, foreign)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    ours = save_sparse_model(model, targets, None, tmp_path / "ours")
    first = _tree(ours)
    save_sparse_model(model, targets, None, ours)
    assert _tree(ours).keys() == first.keys() and _kind(ours) == "sparse_model"
    assert _no_temp_folders(tmp_path)


def test_stale_temp_folders_of_a_dead_process_are_cleaned_at_the_next_save(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    orphan = tmp_path / f".dpruner-tmp.{pid}.abcd1234.pruned_model"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"half")
    # A swap cut between its two renames: the earlier export was set aside and the new one not yet in place.
    aside = tmp_path / f".dpruner-old.{pid}.abcd1234.sparse_model"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    export_hf_folder(tiny_model("llama"), None, tmp_path / "pruned_model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned_model", "sparse_model"]
    assert (tmp_path / "sparse_model" / "config.json").read_text() == "{}"  # put back, not deleted


def test_fit_refuses_an_export_folder_of_user_files_before_any_pass(tmp_path, monkeypatch):
    import lightning as L

    from dpruner_lightning.config import OutputSpec
    from dpruner_lightning.methods import DPrunerMethod
    from dpruner_lightning.module import DPrunerModule

    from .helpers import smoke_data, tiny_spec

    (tmp_path / "pruned_model").mkdir()
    (tmp_path / "pruned_model" / "notes.md").write_text("mine")
    calls = []
    monkeypatch.setattr(DPrunerMethod, "start_pass", lambda self, p: calls.append(p))
    module = DPrunerModule(model=tiny_spec(), output=OutputSpec(save_importance=False, save_masks=False))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **module.trainer_kwargs(), default_root_dir=str(tmp_path))
    with pytest.raises(FileExistsError, match="notes.md"):
        trainer.fit(module, smoke_data())
    assert calls == [] and (tmp_path / "pruned_model" / "notes.md").read_text() == "mine"
