"""The model a command is pointed at (``dpruner eval``, ``dpruner speed``): a Hugging Face folder (dense,
or a run's ``pruned_model/``), our sparse checkpoint (``sparse_model/``), a structurally pruned folder, a
2:4 ``compressed_24_model/``, a run folder holding one of those exports (``pruned_model/`` first), a demo
alias, a hub id or ``random:<type>``. Checked before anything is loaded; each kind loaded by its own reader.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_model_folder(path: str | Path) -> tuple[Path, str]:
    """``(folder, kind)`` of a local model: kind ``sparse`` (our sparse checkpoint), ``structured`` (a
    config with a structured-pruning record), ``compressed_24`` or ``hf``; a run folder resolves to its
    first export (``pruned_model/``, ``sparse_model/``, ``compressed_24_model/``)."""
    from .algorithms.structured import CONFIG_RECORD
    from .deploy import FORMAT as COMPRESSED_24_FORMAT
    from .rundir import EXPORT_FOLDERS
    from .sparse_format import SPARSE_FILE

    path = Path(path).expanduser()
    if (path / SPARSE_FILE).is_file():
        return path, "sparse"
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except ValueError as err:
            raise ValueError(f"{path / 'config.json'} is not valid JSON ({err}): copy or export the model again") from None
        if CONFIG_RECORD in config:
            return path, "structured"
        sparsity = (config.get("quantization_config") or {}).get("sparsity_config") or {}
        return path, "compressed_24" if sparsity.get("format") == COMPRESSED_24_FORMAT else "hf"
    for name in EXPORT_FOLDERS:
        if (path / name).is_dir():
            return resolve_model_folder(path / name)
    runs = sorted(p.parent.name for name in EXPORT_FOLDERS for p in path.glob(f"*/{name}"))
    hint = f"; its subfolders {sorted(set(runs))} are runs with an export: pass one" if runs else (
        "; a run exports its model when output.export_model (or export_sparse) is true")
    raise FileNotFoundError(f"{path} holds no model: neither config.json, {SPARSE_FILE}, nor a run's "
                            f"{' or '.join(f'{n}/' for n in EXPORT_FOLDERS)}{hint}")


def check_model(name: str, tokenizer: Optional[str] = None) -> Optional[tuple[Path, str]]:
    """Fail fast (nothing loaded) on a model that cannot be loaded; ``(folder, kind)`` of a local
    one (:func:`resolve_model_folder`), None for an alias, hub id or ``random:*``."""
    from .config import ModelSpec
    from .models import check_model_source

    if not Path(name).expanduser().is_dir():  # a missing local path, an unknown random:<type> fail here
        check_model_source(ModelSpec(name_or_path=name))
        return None
    folder, kind = resolve_model_folder(name)
    if tokenizer is None and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}): pass --tokenizer "
                                "<tokenizer folder | hub id | bytes>")
    if kind not in ("sparse", "compressed_24"):
        check_model_source(ModelSpec(name_or_path=str(folder)))  # truncated weight files
    return folder, kind


def load_model(name: str, dtype: str = "float32", tokenizer: Optional[str] = None,
               config_overrides: Optional[dict] = None) -> tuple[torch.nn.Module, Any, dict]:
    """``(model in eval mode, tokenizer, {"path", "kind"})`` for any model the module docstring lists;
    ``tokenizer``: default the folder's own (``bytes`` for ``random:*``)."""
    from .config import ModelSpec
    from .export import load_sparse_model
    from .models import load_causal_lm, load_tokenizer, torch_dtype

    spec = ModelSpec(name_or_path=name, dtype=dtype, config_overrides=dict(config_overrides or {}),
                     tokenizer=tokenizer or ("bytes" if name.startswith("random:") else None))
    located = check_model(name, tokenizer)
    if located is None:
        return load_causal_lm(spec), load_tokenizer(spec), {"path": name, "kind": "hf"}
    folder, kind = located
    spec.name_or_path, spec.tokenizer = str(folder), tokenizer or str(folder)
    if kind == "sparse":
        model = load_sparse_model(folder, dtype=torch_dtype(dtype))
    elif kind == "compressed_24":  # plain from_pretrained would leave the pruned matrices random
        from .deploy import load_compressed_24

        model = load_compressed_24(folder, dtype=torch_dtype(dtype)).eval()
    elif kind == "structured":
        from .algorithms.structured import load_structured_pruned

        model = load_structured_pruned(str(folder), dtype=torch_dtype(dtype)).eval()
    else:
        model = load_causal_lm(spec)
    log.info("loaded %s (%s) from %s", name, kind, folder)
    return model, load_tokenizer(spec), {"path": str(folder), "kind": kind}
