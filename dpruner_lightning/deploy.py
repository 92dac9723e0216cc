"""A 2:4-pruned model in compressed-tensors' 2:4 layout (``sparse-24-bitmask``), for tools that read it.

The layout. A Hugging Face folder (``config.json``, tokenizer, ``model.safetensors``) in which every
target linear ``<module>`` is stored as three tensors instead of ``<module>.weight``:

* ``<module>.compressed``: the kept values, ``[rows, cols / 2]`` in the weight's dtype (2 per group of 4
  inputs, in row-major order);
* ``<module>.bitmask``: where they were, one bit per weight entry packed 8 per byte along each row
  (least significant bit first), ``[rows, ceil(cols / 8)]`` uint8;
* ``<module>.shape``: ``[[rows], [cols]]`` int64.

Every other tensor is stored dense under its usual name (a tied ``lm_head`` once, re-tied on load).
``config.json`` carries the metadata readers dispatch on::

    "quantization_config": {"quant_method": "compressed-tensors", "version": <compressed-tensors version>,
                            "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4",
                                                "targets": [<every target linear>], "global_sparsity": ...}}

built with compressed-tensors' own ``Sparse24BitMaskConfig``; the bits are packed and unpacked with its
own ``pack_bitmasks`` / ``unpack_bitmasks``. At bf16 a target costs 1/2 + 1/16 of its dense bytes.

Who reads it (checked 2026): compressed-tensors up to 0.14 (``ModelCompressor.from_pretrained(folder)``
then ``.decompress(folder, model)``; ``tests/test_deploy.py`` runs that round trip whenever such a
version is installed), and vLLM releases from before its Sparse24 support was removed (vLLM PR #36799,
March 2026). compressed-tensors 0.15 and later dropped its sparse compressors (0.20 keeps the format
name, marked legacy, and its config class) and transformers >= 5 ignores ``sparsity_config``: with those,
:func:`load_compressed_24` here is the reader, and ``AutoModelForCausalLM.from_pretrained`` on this
folder does NOT restore the target weights. For a folder every current tool loads, export the dense
HF folder (``pruned_model/``; the zeros are in the weights, 2:4 and all); for the GPU kernels in
memory, :func:`dpruner_lightning.export.to_semi_structured`.

compressed-tensors is imported only when a function here runs (``pip install -e '.[deploy]'``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from .export import artifact_folder, atomic_write_json, check_finite, load_dense_state, read_safetensors, save_tensors
from .extras import require
from .semi_structured import check_2_4
from .sparse_format import CorruptCheckpointError

log = logging.getLogger(__name__)

FORMAT = "sparse-24-bitmask"
WEIGHTS_FILE = "model.safetensors"
KIND = "compressed_24_model"
PARTS_24 = ("compressed", "bitmask", "shape")


def _compressed_tensors():
    """The ``compressed_tensors`` module (with the parts used here), or an ImportError naming the extra."""
    return require("deploy", "the 2:4 compressed-tensors export", "compressed_tensors", "compressed_tensors.config",
                   "compressed_tensors.utils")


def keep_24(weight: torch.Tensor) -> torch.Tensor:
    """Exactly 2 positions of every group of 4 inputs (the layout stores 2 values per group): the
    non-zeros first, then, in a group with fewer than 2, its first zeros (stored as zeros)."""
    rows, cols = weight.shape
    nonzero = (weight != 0).reshape(rows, cols // 4, 4).to(torch.int16)
    key = nonzero * 4 + torch.arange(3, -1, -1, dtype=torch.int16, device=weight.device)  # ties: lower position
    keep = torch.zeros(nonzero.shape, dtype=torch.bool, device=weight.device)
    keep.scatter_(2, key.topk(2, dim=2).indices, True)
    return keep.reshape(rows, cols)


def compress_24(weight: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """``{"compressed", "bitmask", "shape"}`` of one 2:4 weight (:class:`~.semi_structured.Not24Error`
    naming ``name`` if it is not 2:4)."""
    from compressed_tensors.utils import pack_bitmasks

    check_2_4(weight, name)
    w = weight.detach().cpu().contiguous()
    keep = keep_24(w)
    rows, cols = w.shape
    return {"compressed": w[keep].reshape(rows, cols // 2), "bitmask": pack_bitmasks(keep),
            "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1)}


def decompress_24(parts: dict[str, torch.Tensor], where: str = "tensor") -> torch.Tensor:
    """The dense weight of :func:`compress_24`'s parts; parts that do not fit together raise
    :class:`CorruptCheckpointError` naming ``where``."""
    from compressed_tensors.utils import unpack_bitmasks

    shape = [int(s) for s in parts["shape"].flatten().tolist()]
    values, bits = parts["compressed"], parts["bitmask"]
    if len(shape) != 2 or shape[1] % 4 or tuple(values.shape) != (shape[0], shape[1] // 2) \
            or tuple(bits.shape) != (shape[0], -(-shape[1] // 8)) or bits.dtype != torch.uint8:
        raise CorruptCheckpointError(f"{where}: parts do not fit shape {shape}: compressed {tuple(values.shape)}, "
                                     f"bitmask {tuple(bits.shape)} {bits.dtype}: re-export it")
    keep = unpack_bitmasks(bits, shape)
    if not bool((keep.reshape(shape[0], -1, 4).sum(dim=2) == 2).all()):
        raise CorruptCheckpointError(f"{where}: bitmask does not mark exactly 2 of every 4 inputs: re-export it")
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[keep] = values.flatten()
    return dense


def _target_linears(model: nn.Module, targets: Optional[Iterable[str]]) -> dict[str, nn.Linear]:
    from .algorithms.targets import find_targets

    names = list(targets) if targets is not None else list(find_targets(model))
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"targets not in the model: {missing[:5]}; pass the module names of its pruned linears")
    wrong = {n: type(modules[n]).__name__ for n in names if not isinstance(modules[n], nn.Linear)}
    if wrong:
        raise TypeError(f"the sparse-24-bitmask layout stores nn.Linear weights (out x in, grouped along inputs); "
                        f"these targets are not: {dict(list(wrong.items())[:3])} (GPT-2's Conv1D stores in x out). "
                        "Export the dense HF folder for this model instead.")
    return {n: modules[n] for n in names}


def export_compressed_24(model: nn.Module, tokenizer, folder: str | Path, targets: Optional[Iterable[str]] = None) -> Path:
    """Write ``model`` into ``folder`` in the ``sparse-24-bitmask`` layout (see the module docstring).

    ``targets``: the module names of the pruned linears (default: every linear in the decoder blocks,
    as :func:`~dpruner_lightning.algorithms.targets.find_targets` picks them). Every target must be an
    ``nn.Linear`` whose weight is 2:4 (:class:`~dpruner_lightning.semi_structured.Not24Error` naming the
    matrix otherwise) and every tensor finite; both are checked before anything is written. The folder
    is written through :func:`~dpruner_lightning.export.artifact_folder` (aside, then swapped in; never
    over files this package did not write)."""
    ct = _compressed_tensors()
    from compressed_tensors.config import Sparse24BitMaskConfig

    linears = _target_linears(model, targets)
    state = model.state_dict()
    check_finite(state, "refusing to export the model")
    for name, module in linears.items():
        check_2_4(module.weight, name)
    weight_of = {f"{n}.weight": n for n in linears}
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple]] = set()
    zeros = total = 0
    for key, t in state.items():
        ident = (t.data_ptr(), tuple(t.shape))
        if ident in seen:  # a tied weight (lm_head = embeddings): stored once, re-tied on load
            continue
        seen.add(ident)
        if t.is_floating_point():
            zeros, total = zeros + int((t == 0).sum()), total + t.numel()
        if key in weight_of:
            for part, value in compress_24(t, weight_of[key]).items():
                tensors[f"{weight_of[key]}.{part}"] = value
        else:
            tensors[key] = t.detach().cpu().contiguous()
    sparsity = Sparse24BitMaskConfig(targets=sorted(linears), global_sparsity=zeros / max(1, total))
    metadata = {"quant_method": "compressed-tensors", "version": ct.__version__,
                "sparsity_config": sparsity.model_dump(exclude={"registry_requires_subclass"})}
    dtype = next(iter(linears.values())).weight.dtype if linears else next(model.parameters()).dtype
    with artifact_folder(folder, KIND) as tmp:
        model.config.save_pretrained(tmp)
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"] = metadata
        config["dtype"] = str(dtype).removeprefix("torch.")
        config["architectures"] = config.get("architectures") or [type(model).__name__]  # readers dispatch on it
        atomic_write_json(tmp / "config.json", config)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_tensors(tmp / WEIGHTS_FILE, tensors, {"format": "pt"})  # "pt": what HF loaders expect
    log.info("wrote %s: %d target linears in %s layout, %.1f%% of all parameters zero", folder, len(linears), FORMAT,
             100 * zeros / max(1, total))
    return Path(folder)


def read_compressed_24_config(folder: str | Path) -> dict:
    """The ``sparsity_config`` of a folder written by :func:`export_compressed_24`, validated by
    compressed-tensors' own config class; raises ``ValueError`` if the folder is not in this layout."""
    _compressed_tensors()
    from compressed_tensors.config import SparsityCompressionConfig

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    config = json.loads(path.read_text()).get("quantization_config") or {}
    sparsity = config.get("sparsity_config") or {}
    if config.get("quant_method") != "compressed-tensors" or sparsity.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} folder (quantization_config: quant_method "
                         f"{config.get('quant_method')!r}, sparsity format {sparsity.get('format')!r})")
    parsed = SparsityCompressionConfig.load_from_registry(FORMAT, **sparsity)
    if parsed.sparsity_structure != "2:4":
        raise ValueError(f"{path}: sparsity_structure {parsed.sparsity_structure!r}, expected '2:4'")
    return parsed.model_dump(exclude={"registry_requires_subclass"})


def read_compressed_24_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict stored in a :func:`export_compressed_24` folder (every target decompressed)."""
    sparsity = read_compressed_24_config(folder)
    path = Path(folder) / WEIGHTS_FILE
    tensors, _ = read_safetensors(path)
    state = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in sparsity["targets"]
             or k.rpartition(".")[2] not in PARTS_24}
    for module in sparsity["targets"]:
        parts = {p: tensors.get(f"{module}.{p}") for p in PARTS_24}
        absent = [p for p, t in parts.items() if t is None]
        if absent:
            raise CorruptCheckpointError(f"{path}: target {module!r} has no {absent[0]!r} tensor: re-export it")
        state[f"{module}.weight"] = decompress_24(parts, where=f"{path}: {module!r}")  # type: ignore[arg-type]
    return state


def load_compressed_24(folder: str | Path, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The model of an :func:`export_compressed_24` folder as a regular (dense-tensor) HF causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    state = read_compressed_24_state(folder)
    targets = read_compressed_24_config(folder)["targets"]
    dtype = dtype or (state[f"{targets[0]}.weight"].dtype if targets else None)  # default: as stored
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):  # from_config must build a plain model: the weights are dense now
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return load_dense_state(model, state, f"{folder}: compressed 2:4 weights")
