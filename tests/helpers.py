"""Running a whole prune in-process on a tiny model (shared by several test files)."""

from __future__ import annotations

import hashlib

import lightning as L
import torch

from dpruner_lightning.config import MaskSpec, ModelSpec, OutputSpec
from dpruner_lightning.data import CalibrationDataModule, TextSource
from dpruner_lightning.module import DPrunerModule
from dpruner_lightning.quiet import install_known_filters

from .conftest import SMOKE, TINY


def tiny_spec(family: str = "llama", **kw) -> ModelSpec:
    return ModelSpec(name_or_path=f"random:{family}", tokenizer="bytes", config_overrides=dict(TINY[family]), **kw)


def smoke_data(seed: int = 0, **kw) -> CalibrationDataModule:
    args = dict(seq_len=32, num_samples=6, batch_size=2, eval_fraction=0.2, eval_samples=4, seed=seed)
    args.update(kw)
    return CalibrationDataModule(general=TextSource(path=str(SMOKE / "general.txt")),
                                 domain=TextSource(path=str(SMOKE / "domain.txt")), **args)


def run_prune(tmp_path, family="llama", method=None, mask=None, seed=0, validate=True, **data_kw) -> DPrunerModule:
    install_known_filters()
    module = DPrunerModule(model=tiny_spec(family), method=method, mask=mask or MaskSpec(sparsity=0.5),
                           output=OutputSpec(export_model=False, save_importance=False, save_masks=False))
    data = smoke_data(seed=seed, **data_kw)
    trainer = L.Trainer(**module.trainer_kwargs(), accelerator="cpu", devices=1, enable_checkpointing=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path))
    trainer.fit(module, data)
    if validate:
        trainer.validate(module, data, verbose=False)
    return module


def mask_hash(masks: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].cpu().numpy().tobytes())
    return h.hexdigest()


def token_batches(seed: int, n: int, batch: int = 2, seq_len: int = 16, vocab: int = 257) -> list[torch.Tensor]:
    """``n`` seeded ``[batch, seq_len]`` batches of random token ids (the tiny models' vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq_len), generator=g) for _ in range(n)]


def fused_kernels_compile(device: str) -> bool:
    """Whether ``kernels: compiled`` can build its kernels on ``device`` here: a C++ compiler for the CPU
    (inductor's ``$CXX``, default g++), Triton for CUDA."""
    import os
    import shutil

    if device == "cpu":
        return shutil.which(os.environ.get("CXX", "g++")) is not None
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
