"""Writing results: every file is written to a temporary name and renamed into place, so an
interrupted run never leaves a half-written file over an earlier good one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Safetensors file of CPU-contiguous copies (bool masks are stored as uint8)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {}
    for name, t in tensors.items():
        t = t.detach()
        flat[name] = (t.to(torch.uint8) if t.dtype == torch.bool else t).contiguous().cpu()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(flat, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"no tensor file at {path}")
    return load_file(str(path))


def export_hf_folder(model: torch.nn.Module, tokenizer, folder: str | Path) -> Path:
    """``save_pretrained`` into a temporary sibling folder, then swap it in place of ``folder``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# -- sparse storage: a bitmask plus the kept values ------------------------------------------------
SPARSE_FILE = "sparse_model.safetensors"


@torch.no_grad()
def pack_sparse(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A matrix as ``bits`` (1 bit per entry, set = non-zero, packed little-endian into uint8) and
    ``values`` (the non-zero entries in row-major order, in the weight's dtype)."""
    import numpy as np

    flat = weight.detach().reshape(-1).cpu()
    nonzero = flat != 0
    bits = torch.from_numpy(np.packbits(nonzero.numpy(), bitorder="little"))
    return {"bits": bits, "values": flat[nonzero].contiguous(), "shape": torch.tensor(list(weight.shape))}


def unpack_sparse(bits: torch.Tensor, values: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    import numpy as np

    n = int(torch.prod(shape))
    nonzero = torch.from_numpy(np.unpackbits(bits.numpy(), count=n, bitorder="little").astype(bool))
    dense = torch.zeros(n, dtype=values.dtype)
    dense[nonzero] = values
    return dense.view(*shape.tolist())


def save_sparse_model(model: torch.nn.Module, target_names: list[str], tokenizer, folder: str | Path) -> Path:
    """Our sparse format: the HF config (+ tokenizer) and ONE safetensors file in which every target
    weight is a bitmask plus its kept values and every other tensor is stored dense. At 50% sparsity a
    bf16 matrix takes 1/16 + 1/2 of its dense bytes (56%). :func:`load_sparse_model` restores the model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {f"{n}.weight" for n in target_names}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:  # a tied weight (lm_head = embeddings): stored once, re-tied on load
            continue
        seen.add(key)
        if name in weights:
            for part, t in pack_sparse(tensor).items():
                tensors[f"{name}::{part}"] = t
        else:
            tensors[name] = tensor
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    save_tensors(folder / SPARSE_FILE, tensors, {"format": "dpruner-sparse-v1"})
    return folder


def load_sparse_model(folder: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model saved by :func:`save_sparse_model`, as a regular (dense-tensor) HF causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    tensors = load_tensors(folder / SPARSE_FILE)
    state: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        name, sep, part = key.partition("::")
        if not sep:
            state[name] = t
        elif part == "bits":
            state[name] = unpack_sparse(t, tensors[f"{name}::values"], tensors[f"{name}::shape"])
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied - {k for k in missing if k.endswith("lm_head.weight")}:
        raise RuntimeError(f"{folder}: sparse checkpoint does not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
