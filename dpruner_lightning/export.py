"""Writing results: every file is written to a temporary name and renamed into place, so an
interrupted run never leaves a half-written file over an earlier good one. Export folders are
written aside and swapped in only over an empty folder or one this package wrote (never over the
user's files), and nothing holding NaN / inf is exported. A tensor file that cannot be read back as
saved raises :class:`CorruptCheckpointError` naming the file (and the tensor)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

# The in-memory GPU form of a 2:4 model (``to_semi_structured``) is an export too: its code lives in
# semi_structured, re-exported here (the `X as X` form marks a re-export). The on-disk 2:4 layout of
# compressed-tensors is in deploy (it needs the [deploy] extra).
from .semi_structured import Not24Error as Not24Error
from .semi_structured import check_2_4 as check_2_4
from .semi_structured import is_2_4 as is_2_4
from .semi_structured import semi_structured_plan as semi_structured_plan
from .semi_structured import to_semi_structured as to_semi_structured
from .sparse_format import (
    CHECKSUM_FILE,
    PARTS,
    REEXPORT,
    SPARSE_FILE,
    SPARSE_FORMAT,
    CorruptCheckpointError,
    checksum_table,
    pack_sparse,
    unpack_sparse,
    verify_checksums,
)

log = logging.getLogger(__name__)

# mkstemp / mkdtemp create 0600 files and 0700 folders: an export would be unreadable by anyone else
# (a server running as another user). Written files get the modes a plain open() would give them.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class NonFiniteError(FloatingPointError):
    """A tensor holds NaN or inf where a result must be finite."""


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, hint: str = "") -> None:
    """Raise :class:`NonFiniteError` naming the first floating-point tensor with NaN / inf entries."""
    for name, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        # NaN / inf propagate into the sum, which allocates nothing the size of the tensor (isfinite()
        # would: 500 MB of bools for a large embedding). Only a non-finite sum is looked at entry by entry
        # (it may be a mere overflow of large finite values).
        if bool(torch.isfinite(t.detach().sum())):
            continue
        bad = int((~torch.isfinite(t.detach())).sum())
        if bad:
            raise NonFiniteError(f"{what}: {name!r} has {bad} of {t.numel()} entries NaN or inf"
                                 + (f"; {hint}" if hint else ""))


# -- safetensors files -------------------------------------------------------------------------------
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
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; a truncated or garbage file raises
    :class:`CorruptCheckpointError` naming ``path``."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"no tensor file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:  # truncated, garbage, a broken header: safetensors' message names no file
        raise CorruptCheckpointError(f"{path}: not a readable safetensors file ({e}): {REEXPORT}") from e


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


# -- artifact folders: written aside, swapped in only over an empty folder or one we wrote -----------
MANIFEST = ".dpruner_export.json"
_TMP, _OLD = ".dpruner-tmp.", ".dpruner-old."  # + "<pid>.<random>.<folder name>"


def _manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()} - {MANIFEST}


def check_replaceable(folder: str | Path) -> None:
    """Raise ``FileExistsError`` unless an export may go to ``folder``: it does not exist, is an empty
    folder, or is a folder this package wrote (its manifest lists every file in it). Anything else
    (a file, a link, a folder holding files we did not write) is the user's and is never deleted."""
    folder = Path(folder)
    if not (folder.exists() or folder.is_symlink()):
        return
    if folder.is_symlink() or not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder: refusing to replace it with an export. "
                              "Choose another path, or remove it yourself.")
    manifest = _manifest(folder)
    foreign = sorted(_files(folder) - set(manifest.get("files", []) if manifest else []))
    if foreign or (manifest is None and any(folder.iterdir())):
        shown = foreign[:3] or sorted(p.name for p in folder.iterdir())[:3]
        raise FileExistsError(f"{folder} is not empty and holds files dpruner_lightning did not write (e.g. {shown}): "
                              "refusing to replace it. Choose another folder, or remove it yourself.")


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        pass
    return True


def _clean_stale(parent: Path) -> None:
    """Remove the temp folders of earlier runs that died mid-export (their process is gone). A folder
    set aside during a swap that was cut between its two renames is put back instead."""
    for entry in parent.iterdir():
        prefix = next((p for p in (_TMP, _OLD) if entry.name.startswith(p)), None)
        if prefix is None or not entry.is_dir():
            continue
        pid, _, rest = entry.name[len(prefix):].partition(".")
        name = rest.partition(".")[2]
        if not (pid.isdigit() and name) or pid_alive(int(pid)):
            continue
        if prefix == _OLD and not (parent / name).exists():
            with suppress(OSError):  # best effort: never block the new save, never delete it
                os.replace(entry, parent / name)
        else:
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def artifact_folder(folder: str | Path, kind: str) -> Iterator[Path]:
    """Yield an empty temp folder beside ``folder`` to write an export into; when the block succeeds,
    mark it as ours (:data:`MANIFEST`) and swap it in place of ``folder``. The old ``folder`` is only
    replaced if :func:`check_replaceable` allows it; on any failure the temp folder is removed and
    ``folder`` is left as it was."""
    folder = Path(folder)
    check_replaceable(folder)  # before writing anything
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(folder.parent)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f"{_TMP}{os.getpid()}.", suffix=f".{folder.name}"))
    try:
        yield tmp
        atomic_write_json(tmp / MANIFEST, {"kind": kind, "files": sorted(_files(tmp))})
        for p in [tmp, *tmp.rglob("*")]:  # libraries' writers (save_pretrained) may use private modes too
            if not p.is_symlink():
                p.chmod(DIR_MODE if p.is_dir() else FILE_MODE)
        check_replaceable(folder)  # again: the user may have put something there meanwhile
        if folder.is_dir() and any(folder.iterdir()):  # an earlier export of ours: set it aside first
            old = folder.with_name(f"{_OLD}{os.getpid()}.{uuid.uuid4().hex[:8]}.{folder.name}")
            os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except BaseException:
                os.replace(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:  # rename() replaces an empty folder atomically
            os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful swap


def export_hf_folder(model: torch.nn.Module, tokenizer, folder: str | Path) -> Path:
    """``save_pretrained`` (model and tokenizer) into ``folder`` through :func:`artifact_folder`."""
    with artifact_folder(folder, "pruned_model") as tmp:
        write_hf_folder(model, tokenizer, tmp)
    return Path(folder)


def write_hf_folder(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    check_finite(model.state_dict(), "refusing to export the model")
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


# -- the sparse checkpoint folder (the format itself: sparse_format.py) ---------------------------------
def save_sparse_model(model: torch.nn.Module, target_names: list[str], tokenizer, folder: str | Path) -> Path:
    """Our sparse format: the HF config (+ tokenizer) and ONE safetensors file in which every target
    weight is a bitmask plus its kept values and every other tensor is stored dense. At 50% sparsity a
    bf16 matrix takes 1/16 + 1/2 of its dense bytes (56%). :func:`load_sparse_model` restores the model."""
    check_finite(model.state_dict(), "refusing to export the model")
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
            tensors[name] = tensor.detach().contiguous().cpu()  # the bytes save_tensors stores
    with artifact_folder(folder, "sparse_model") as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_tensors(tmp / SPARSE_FILE, tensors, {"format": SPARSE_FORMAT})
        atomic_write_json(tmp / CHECKSUM_FILE, {"algorithm": "sha256", "file": SPARSE_FILE,
                                                "tensors": checksum_table(tensors)})
    return Path(folder)


def read_sparse_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The (dense) state dict stored in a sparse checkpoint folder, checked as sparse_format's docstring says."""
    path = Path(folder) / SPARSE_FILE
    tensors, metadata = read_safetensors(path)  # a truncated / garbage file raises, naming it
    verified = verify_checksums(path, tensors, path.with_name(CHECKSUM_FILE))
    if not verified:
        log.warning("%s has no checksums (written before they were recorded): it cannot be verified; "
                    "re-export it to add them", path)
    # A structural fault in a verified file was written that way (its bytes are as saved).
    hint = "its checksums match, so it was written inconsistently: re-export it" if verified else REEXPORT
    if metadata.get("format") != SPARSE_FORMAT:
        raise CorruptCheckpointError(f"{path}: format tag {metadata.get('format')!r}, expected {SPARSE_FORMAT!r}: "
                                     "not a sparse checkpoint written by save_sparse_model, or its header was modified")
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name, sep, part = key.partition("::")
        if not sep:
            state[name] = t
        elif part in PARTS:
            packed.setdefault(name, {})[part] = t
        else:
            raise CorruptCheckpointError(f"{path}: tensor {key!r} is no part of a packed weight "
                                         f"({'/'.join(PARTS)}): {hint}")
    for name, parts in packed.items():
        missing = [p for p in PARTS if p not in parts]
        if missing:
            have = ", ".join(f"'{name}::{p}'" for p in parts)
            raise CorruptCheckpointError(f"{path}: tensor '{name}::{missing[0]}' is missing "
                                         f"(the file has {have}): {hint}")
        if name in state:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} is stored both dense and packed: {hint}")
        state[name] = unpack_sparse(parts["bits"], parts["values"], parts["shape"],
                                    where=f"{path}: tensor {name!r}", hint=hint)
    return state


def load_sparse_model(folder: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model saved by :func:`save_sparse_model`, as a regular (dense-tensor) HF causal LM. A damaged
    checkpoint raises :class:`CorruptCheckpointError` naming the file and the tensor; one saved before
    checksums were recorded loads with a warning that it cannot be verified."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    state = read_sparse_state(folder)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype)
    return load_dense_state(model, state, f"{folder / SPARSE_FILE}: sparse checkpoint")


def load_dense_state(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """``model`` (built from its config) with ``state`` loaded, tied weights re-tied, in eval mode;
    a state that does not fit the config raises, naming ``what`` (the file and its kind)."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not fit the config; torch's message names the tensors
        raise RuntimeError(f"{what} does not match the config: {e}") from e
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied - {k for k in missing if k.endswith("lm_head.weight")}:
        raise RuntimeError(f"{what} does not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()
