"""Our sparse checkpoint format, the tensors and their checks. A checkpoint is the HF config (+ tokenizer)
and ONE safetensors file (:data:`SPARSE_FILE`) in which every target weight is stored as
``<name>::bits`` (a bitmask), ``<name>::values`` (the kept entries) and ``<name>::shape``, and every other
tensor dense; beside it, :data:`CHECKSUM_FILE` holds the sha256 (and dtype and shape) of every stored
tensor. Loading checks those and that the parts of every packed weight fit together, and names the file
and the tensor when something does not.

This module holds the format (packing, checksums, :class:`CorruptCheckpointError`) and imports nothing
from the package; writing and reading checkpoint folders (``save_sparse_model`` / ``load_sparse_model``)
is in :mod:`dpruner_lightning.export`, which re-exports the names here, where they have always been."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Mapping

import torch

REEXPORT = "the file was modified or truncated after it was saved: re-export it"


class CorruptCheckpointError(ValueError):
    """A tensor file does not hold what was saved: unreadable, truncated, a checksum that does not
    match, or (for the sparse checkpoint) parts that do not fit together. The message names the file
    and, where there is one, the tensor."""


SPARSE_FILE = "sparse_model.safetensors"
SPARSE_FORMAT = "dpruner-sparse-v1"  # unchanged by the checksums: older versions read new checkpoints (and back)
PARTS = ("bits", "values", "shape")
# The checksums go in a sidecar json, not in the safetensors metadata: the table repeats every tensor
# name beside a 64-hex digest, which grows the test's tiny models' file by ~5% (and the 56% size promise
# with it), while the tensor file stays byte for byte what it was. The sidecar is written in the same
# temp folder that artifact_folder swaps in whole, so the two cannot get out of step by an interrupted
# save, and the folder's manifest lists it.
CHECKSUM_FILE = "sparse_model.sha256.json"


# -- checksums ----------------------------------------------------------------------------------------
def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the raw bytes of a tensor as stored (CPU, contiguous, bool as uint8): one pass, no
    copy for a tensor already in that form."""
    t = t.detach()
    t = (t.to(torch.uint8) if t.dtype == torch.bool else t).contiguous().cpu()
    return hashlib.sha256(memoryview(t.reshape(-1).view(torch.uint8).numpy())).hexdigest()


def _dtype_name(t: torch.Tensor) -> str:
    return str(torch.uint8 if t.dtype == torch.bool else t.dtype).removeprefix("torch.")


def checksum_table(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """``{name: {"sha256", "dtype", "shape"}}``: about 0.1 s per 100 MB (sha256 runs at ~1 GB/s)."""
    return {n: {"sha256": tensor_sha256(t), "dtype": _dtype_name(t), "shape": list(t.shape)}
            for n, t in tensors.items()}


def verify_checksums(path: Path, tensors: Mapping[str, torch.Tensor], sidecar: Path) -> bool:
    """Check ``tensors`` (read from ``path``) against the table in ``sidecar``: every listed tensor
    present with its dtype, shape and sha256, and none unlisted. False when there is no sidecar (a
    checkpoint saved before checksums were recorded); any mismatch raises :class:`CorruptCheckpointError`."""
    if not sidecar.is_file():
        return False
    try:
        table = json.loads(sidecar.read_text())
        algorithm, listed = table["algorithm"], dict(table["tensors"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{sidecar}: the checksums of {path.name} are unreadable ({e}): "
                                     f"{REEXPORT}") from e
    if algorithm != "sha256":
        raise CorruptCheckpointError(f"{sidecar}: unknown checksum algorithm {algorithm!r} (this version knows sha256)")
    absent, unlisted = sorted(set(listed) - set(tensors)), sorted(set(tensors) - set(listed))
    if absent:
        more = f" ({len(absent)} missing)" if len(absent) > 1 else ""
        raise CorruptCheckpointError(f"{path}: tensor {absent[0]!r} is missing from the file{more}: {REEXPORT}")
    if unlisted:
        raise CorruptCheckpointError(f"{path}: tensor {unlisted[0]!r} has no checksum in {sidecar.name}: {REEXPORT}")
    for name, t in tensors.items():
        want = listed[name]
        if want.get("dtype") != _dtype_name(t):
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has a dtype mismatch: stored as {_dtype_name(t)}, "
                                         f"saved as {want.get('dtype')}: {REEXPORT}")
        if want.get("shape") != list(t.shape):
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has shape {list(t.shape)}, saved as "
                                         f"{want.get('shape')}: {REEXPORT}")
        if want.get("sha256") != tensor_sha256(t):
            raise CorruptCheckpointError(f"{path}: tensor {name!r} does not match its sha256 checksum: {REEXPORT}")
    return True


# -- packing ------------------------------------------------------------------------------------------
@torch.no_grad()
def pack_sparse(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A matrix as ``bits`` (1 bit per entry, set = non-zero, packed little-endian into uint8) and
    ``values`` (the non-zero entries in row-major order, in the weight's dtype)."""
    import numpy as np

    flat = weight.detach().reshape(-1).cpu()
    nonzero = flat != 0
    bits = torch.from_numpy(np.packbits(nonzero.numpy(), bitorder="little"))
    return {"bits": bits, "values": flat[nonzero].contiguous(), "shape": torch.tensor(list(weight.shape))}


def _integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def unpack_sparse(bits: torch.Tensor, values: torch.Tensor, shape: torch.Tensor, *,
                  where: str = "packed tensor", hint: str = "") -> torch.Tensor:
    """The dense matrix of :func:`pack_sparse`'s parts. Parts that do not fit together raise
    :class:`CorruptCheckpointError` ``"<where>: <what is wrong>[: <hint>]"``."""
    import numpy as np

    def bad(problem: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: {problem}" + (f": {hint}" if hint else ""))

    if bits.dtype != torch.uint8 or not _integer(shape):
        raise bad(f"dtype mismatch: bits is {bits.dtype} (expected torch.uint8), shape is {shape.dtype} "
                  "(expected an integer type)")
    if bits.dim() != 1 or values.dim() != 1 or shape.dim() != 1:
        raise bad(f"bits, values and shape must be 1-D, are {list(bits.shape)}, {list(values.shape)}, "
                  f"{list(shape.shape)}")
    dims = shape.tolist()
    if any(d < 0 for d in dims):
        raise bad(f"shape {dims} has a negative size")
    n = math.prod(dims)
    if bits.numel() != -(-n // 8):  # checked before anything of size n is allocated
        raise bad(f"shape {dims} ({n} entries) needs a bitmask of {-(-n // 8)} bytes, the bitmask has {bits.numel()}")
    unpacked = np.unpackbits(bits.numpy(), bitorder="little")
    nonzero = torch.from_numpy(unpacked[:n].astype(bool))
    kept, total = int(nonzero.sum()), int(unpacked.sum())
    if kept != values.numel() or kept != total:  # the second: bits set past the end of the matrix
        raise bad(f"bitmask has {total} bits set ({kept} within the shape) but {values.numel()} values are stored")
    dense = torch.zeros(n, dtype=values.dtype)
    dense[nonzero] = values
    return dense.view(*dims)
