"""The sparse checkpoint's integrity checks (issue 9): every stored tensor has a sha256 in a sidecar,
and every way the checkpoint can be damaged raises an error that names the file and the tensor."""

from __future__ import annotations

import json
import logging
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dpruner_lightning.algorithms.masks import apply_mask_, select_mask
from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.export import (
    CHECKSUM_FILE,
    MANIFEST,
    SPARSE_FILE,
    CorruptCheckpointError,
    load_sparse_model,
    load_tensors,
    save_sparse_model,
    save_tensors,
    unpack_sparse,
)
from dpruner_lightning.sparse_format import checksum_table

from .conftest import tiny_model

REEXPORT = "the file was modified or truncated after it was saved: re-export it"
UP = "model.layers.0.mlp.up_proj.weight"  # a packed (target) weight of the tiny llama


@pytest.fixture
def saved(tmp_path):
    """A pruned tiny llama (float32) and its sparse checkpoint folder."""
    model = tiny_model("llama")
    targets = find_targets(model)
    for t in targets.values():
        apply_mask_(t.weight_view(), select_mask(t.weight_view().float().abs(), 0.5))
    return model, save_sparse_model(model, list(targets), None, tmp_path / "sparse")


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _rewrite(folder, *, drop=(), replace=None, checksums: bool | None = None) -> None:
    """Rewrite the tensor file with the same metadata, some tensors dropped or replaced. ``checksums``:
    True = recompute the sidecar for the new content (a writer bug, not damage), False = delete it (a
    checkpoint from before checksums), None = leave it as saved."""
    path = folder / SPARSE_FILE
    tensors, metadata = _read(path)
    tensors = {k: v for k, v in {**tensors, **(replace or {})}.items() if k not in drop}
    save_file(tensors, str(path), metadata=metadata)
    if checksums is True:
        table = {"algorithm": "sha256", "file": SPARSE_FILE, "tensors": checksum_table(tensors)}
        (folder / CHECKSUM_FILE).write_text(json.dumps(table))
    elif checksums is False:
        (folder / CHECKSUM_FILE).unlink()


def _data_span(path, name) -> tuple[int, int]:
    """Byte range of tensor ``name``'s data in a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _load_error(folder) -> str:
    with pytest.raises(CorruptCheckpointError) as e:
        load_sparse_model(folder)
    return str(e.value)


def test_round_trip_is_bit_exact_and_every_stored_tensor_has_a_checksum(saved, caplog):
    model, folder = saved
    with caplog.at_level(logging.WARNING, logger="dpruner_lightning"):
        reloaded = load_sparse_model(folder)
    assert not caplog.records  # verified: nothing to warn about
    want, got = model.state_dict(), reloaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    table = json.loads((folder / CHECKSUM_FILE).read_text())
    stored, _ = _read(folder / SPARSE_FILE)
    assert table["algorithm"] == "sha256" and table["tensors"].keys() == stored.keys()
    assert {f"{UP}::bits", f"{UP}::values", f"{UP}::shape", "model.norm.weight"} <= table["tensors"].keys()
    assert CHECKSUM_FILE in json.loads((folder / MANIFEST).read_text())["files"]


@pytest.mark.parametrize("name", [f"{UP}::values", f"{UP}::bits", "model.norm.weight"])
def test_one_flipped_byte_names_the_tensor(saved, name):
    _, folder = saved
    path = folder / SPARSE_FILE
    begin, end = _data_span(path, name)
    raw = bytearray(path.read_bytes())
    raw[(begin + end) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    msg = _load_error(folder)
    assert str(path) in msg and f"tensor {name!r} does not match its sha256 checksum" in msg and REEXPORT in msg


def test_a_bitmask_that_does_not_fit_the_values_names_the_tensor(saved):
    _, folder = saved
    unpacked = np.unpackbits(_read(folder / SPARSE_FILE)[0][f"{UP}::bits"].numpy(), bitorder="little")
    unpacked[np.flatnonzero(unpacked == 0)[0]] = 1  # one pruned entry marked kept: one value short
    bits = torch.from_numpy(np.packbits(unpacked, bitorder="little"))
    popcount = int(unpacked.sum())
    _rewrite(folder, replace={f"{UP}::bits": bits}, checksums=True)  # consistent checksums: a writer's bug
    msg = _load_error(folder)
    assert str(folder / SPARSE_FILE) in msg and f"tensor {UP!r}" in msg
    assert f"bitmask has {popcount} bits set ({popcount} within the shape) but {popcount - 1} values are stored" in msg
    assert "its checksums match, so it was written inconsistently: re-export it" in msg


def test_a_shape_that_does_not_fit_the_bitmask_names_the_tensor(saved):
    _, folder = saved
    _rewrite(folder, replace={f"{UP}::shape": torch.tensor([136, 64])}, checksums=False)
    msg = _load_error(folder)
    assert str(folder / SPARSE_FILE) in msg and f"tensor {UP!r}" in msg and REEXPORT in msg
    assert "shape [136, 64] (8704 entries) needs a bitmask of 1088 bytes, the bitmask has 1024" in msg


def test_a_missing_values_entry_names_it(saved):
    _, folder = saved
    _rewrite(folder, drop={f"{UP}::values"})  # metadata and checksums kept: the table lists it
    msg = _load_error(folder)
    assert str(folder / SPARSE_FILE) in msg and f"tensor '{UP}::values' is missing from the file" in msg
    assert REEXPORT in msg


@pytest.mark.parametrize("part", ["bits", "values", "shape"])
def test_a_missing_partner_of_an_unverified_checkpoint_names_it(saved, part):
    _, folder = saved
    _rewrite(folder, drop={f"{UP}::{part}"}, checksums=False)
    msg = _load_error(folder)
    assert str(folder / SPARSE_FILE) in msg and f"tensor '{UP}::{part}' is missing (the file has " in msg
    assert REEXPORT in msg


def test_a_dtype_mismatch_names_the_tensor(saved):
    _, folder = saved
    path = folder / SPARSE_FILE
    raw = path.read_bytes()
    edited = raw.replace(b'"model.norm.weight":{"dtype":"F32"', b'"model.norm.weight":{"dtype":"I32"')
    assert edited != raw and len(edited) == len(raw)  # the header edit keeps every offset
    path.write_bytes(edited)
    msg = _load_error(folder)
    assert str(path) in msg and "tensor 'model.norm.weight' has a dtype mismatch: stored as int32, saved as float32" in msg
    # Without checksums, the parts of a packed weight are still checked for their dtype.
    bits = _read(path)[0][f"{UP}::bits"]
    _rewrite(folder, replace={f"{UP}::bits": bits.to(torch.int16)}, checksums=False)
    msg = _load_error(folder)
    assert str(path) in msg and f"tensor {UP!r}: dtype mismatch: bits is torch.int16 (expected torch.uint8)" in msg


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_an_unreadable_file_names_the_path(saved, damage):
    _, folder = saved
    path = folder / SPARSE_FILE
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[:-100], "garbage": b"not a safetensors file" * 10, "empty": b""}[damage])
    msg = _load_error(folder)
    assert str(path) in msg and "not a readable safetensors file" in msg and REEXPORT in msg


def test_load_tensors_names_the_path_of_a_truncated_file(tmp_path):
    path = save_tensors(tmp_path / "masks.safetensors", {"a": torch.ones(64, 64, dtype=torch.bool)})
    assert torch.equal(load_tensors(path)["a"], torch.ones(64, 64, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError) as e:
        load_tensors(path)
    assert str(path) in str(e.value) and "incomplete" in str(e.value) and REEXPORT in str(e.value)


def test_an_unreadable_checksum_file_names_it(saved):
    _, folder = saved
    (folder / CHECKSUM_FILE).write_text('{"algorithm": "sha256", "tens')
    msg = _load_error(folder)
    assert str(folder / CHECKSUM_FILE) in msg and f"the checksums of {SPARSE_FILE} are unreadable" in msg


def test_a_checkpoint_without_checksums_loads_with_a_warning(saved, caplog):
    model, folder = saved
    (folder / CHECKSUM_FILE).unlink()  # as written before checksums were recorded
    with caplog.at_level(logging.WARNING, logger="dpruner_lightning"):
        reloaded = load_sparse_model(folder)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(folder / SPARSE_FILE) in record.getMessage() and "it cannot be verified" in record.getMessage()


def test_unpack_sparse_refuses_parts_that_do_not_fit():
    bits = torch.tensor([0b1011], dtype=torch.uint8)  # 3 bits set
    with pytest.raises(CorruptCheckpointError, match=r"packed tensor: bitmask has 3 bits set \(3 within the shape\) "
                                                     r"but 2 values are stored"):
        unpack_sparse(bits, torch.ones(2), torch.tensor([2, 4]))
    with pytest.raises(CorruptCheckpointError, match=r"bitmask has 3 bits set \(2 within the shape\)"):
        unpack_sparse(bits, torch.ones(2), torch.tensor([1, 3]))  # bit 3 lies past the 3 entries
    assert torch.equal(unpack_sparse(bits, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2, 2])),
                       torch.tensor([[1.0, 2.0], [0.0, 3.0]]))
