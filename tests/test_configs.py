"""Every YAML in configs/ is validated against the code (classes, argument names and types)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dpruner_lightning.data import CalibrationDataModule
from dpruner_lightning.lightning_cli import DPrunerCLI
from dpruner_lightning.methods.base import PruningMethod
from dpruner_lightning.module import DPrunerModule

from .conftest import REPO

FIT_CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml")
                     if not {"compare", "sweep"} & set(yaml.safe_load(p.read_text()) or {}))


def test_there_are_fit_configs():
    names = {p.name for p in FIT_CONFIGS}
    assert "smoke.yaml" in names


@pytest.mark.parametrize("path", FIT_CONFIGS, ids=lambda p: p.name)
def test_fit_config_instantiates(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the logger may create its folder: keep it out of the repo
    cli = DPrunerCLI(args=["--config", str(path)], run=False)
    assert isinstance(cli.model, DPrunerModule)
    assert isinstance(cli.model.method, PruningMethod)
    assert isinstance(cli.datamodule, CalibrationDataModule)
    assert not cli.trainer.checkpoint_callback  # artifacts are saved explicitly, not by ModelCheckpoint
    # Every value written in the file reached the object it configures.
    raw = yaml.safe_load(path.read_text())
    model = raw.get("model", {})
    method = model.get("method") or {}
    assert type(cli.model.method).__name__ == method.get("class_path", "x.DPrunerMethod").rpartition(".")[2]
    for key, value in (method.get("init_args") or {}).items():
        assert getattr(cli.model.method, key) == value, key
    for section, spec in (("model", cli.model.model_spec), ("mask", cli.model.mask_spec),
                          ("targets", cli.model.target_spec), ("output", cli.model.output)):
        for key, value in (model.get(section) or {}).items():
            assert getattr(spec, key) == value, f"model.{section}.{key}"
    for key, value in (raw.get("data") or {}).items():
        if isinstance(value, dict):  # a text source
            source = cli.datamodule.sources.get(key) or cli.datamodule.eval_sources.get(key.removeprefix("eval_"))
            assert all(getattr(source, k) == v for k, v in value.items()), f"data.{key}"
        else:
            assert getattr(cli.datamodule, key) == value, f"data.{key}"


def test_a_typo_in_a_config_is_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (REPO / "configs" / "smoke.yaml").read_text().replace("lambda_reg:", "lamda_reg:")
    bad.write_text(text)
    with pytest.raises(SystemExit):
        DPrunerCLI(args=["--config", str(bad)], run=False)
