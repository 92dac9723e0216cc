"""Architecture knowledge for structured pruning: one :class:`ArchitectureAdapter` per model family
(projection names, fused-QKV layout, config keys, module attributes the forward reads), the attention
shape of a model, and the *couplings* (which rows / columns of which layers form one prunable group).
Used by :mod:`structured`; no pruning logic here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .targets import Conv1D

# --------------------------------------------------------------------------------------------------
# Architecture adapters
# --------------------------------------------------------------------------------------------------

#: Layouts of the attention input projections.
#:   ``separate``: q, k, v are three layers (Llama, OPT);
#:   ``fused_blocks``: one layer whose outputs are ``[q | k | v]``, each ``heads * head_dim`` (GPT-2);
#:   ``fused_interleaved``: one layer whose outputs are ``[q_0 k_0 v_0 | q_1 k_1 v_1 | ...]``, one
#:   ``3 * head_dim`` block per head (GPT-NeoX: ``view(..., -1, 3 * head_size)`` then ``chunk(3)``).
LAYOUTS = ("separate", "fused_blocks", "fused_interleaved")


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one model family keeps its prunable projections and how its config describes them.

    Module paths are relative to a decoder block. ``attn_attrs`` / ``mlp_attrs`` name attributes of
    the attention / MLP module that the forward reads and that must follow the new sizes; each maps
    to ``"heads"`` (query heads), ``"kv_heads"``, ``"width"`` (query heads * head_dim) or
    ``"channels"``.
    """

    family: str
    model_types: tuple[str, ...]
    layout: str
    attn: str  #: the attention module (its attributes are updated)
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    ffn_key: str  #: config key of the intermediate size
    q: str | None = None  #: separate layout only
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  #: fused layouts only
    mlp: str = "mlp"  #: the module holding the MLP attributes ("" = the block itself, as in OPT)
    has_kv_heads: bool = False  #: config has ``num_key_value_heads`` (GQA possible)
    config_expresses_heads: bool = False  #: attention width comes from ``config.head_dim`` (reload works)
    attn_attrs: tuple[tuple[str, str], ...] = ()
    mlp_attrs: tuple[tuple[str, str], ...] = ()

    def attn_layers(self) -> tuple[str, ...]:
        """Relative names of every attention projection."""
        inputs = (self.q, self.k, self.v) if self.layout == "separate" else (self.qkv,)
        return (*inputs, self.o)  # type: ignore[return-value]

    def mlp_layers(self) -> tuple[str, ...]:
        return (*self.mlp_in, self.mlp_out)


_LLAMA = ArchitectureAdapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    layout="separate",
    attn="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    ffn_key="intermediate_size",
    has_kv_heads=True,
    config_expresses_heads=True,
    # The forward reads head_dim (unchanged) and num_key_value_groups (unchanged: whole KV groups go).
    mlp_attrs=(("intermediate_size", "channels"),),
)
_OPT = ArchitectureAdapter(
    family="opt",
    model_types=("opt",),
    layout="separate",
    attn="self_attn",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.out_proj",
    mlp="",
    mlp_in=("fc1",),
    mlp_out="fc2",
    ffn_key="ffn_dim",
    attn_attrs=(("num_heads", "heads"),),  # OPTAttention.forward: view(bsz, -1, num_heads, head_dim)
)
_GPT2 = ArchitectureAdapter(
    family="gpt2",
    model_types=("gpt2",),
    layout="fused_blocks",
    attn="attn",
    qkv="attn.c_attn",
    o="attn.c_proj",
    mlp_in=("mlp.c_fc",),
    mlp_out="mlp.c_proj",
    ffn_key="n_inner",
    # GPT2Attention.forward: c_attn(x).split(split_size); num_heads kept in sync for readers.
    attn_attrs=(("num_heads", "heads"), ("split_size", "width")),
)
_NEOX = ArchitectureAdapter(
    family="gpt_neox",
    model_types=("gpt_neox",),
    layout="fused_interleaved",
    attn="attention",
    qkv="attention.query_key_value",
    o="attention.dense",
    mlp_in=("mlp.dense_h_to_4h",),
    mlp_out="mlp.dense_4h_to_h",
    ffn_key="intermediate_size",
    # GPTNeoXAttention.forward only reads head_size (unchanged); heads are "-1".
)

#: model_type -> adapter.
ADAPTERS: dict[str, ArchitectureAdapter] = {t: a for a in (_LLAMA, _OPT, _GPT2, _NEOX) for t in a.model_types}


def get_adapter(model_or_config: Any) -> ArchitectureAdapter:
    """The adapter for a model (or its config); ``NotImplementedError`` for unsupported families."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise NotImplementedError(
            f"structured pruning does not support model_type={model_type!r}. Supported: "
            f"{', '.join(sorted(ADAPTERS))} (Llama/Mistral/Qwen2, OPT, GPT-2, GPT-NeoX)."
        )
    return ADAPTERS[model_type]


@dataclass(frozen=True)
class AttentionShape:
    """Current attention geometry of every block (uniform across blocks)."""

    heads: int  #: query heads
    kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        """Prunable attention groups: KV groups (== heads for MHA)."""
        return self.kv_heads

    @property
    def q_per_group(self) -> int:
        return self.heads // self.kv_heads


def attention_shape(model_or_config: Any) -> AttentionShape:
    """Read heads / kv heads / head_dim from the config (``head_dim`` wins over ``hidden // heads``
    because a pruned model no longer satisfies ``heads * head_dim == hidden``)."""
    config = getattr(model_or_config, "config", model_or_config)
    adapter = get_adapter(config)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads) if adapter.has_kv_heads else heads
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    return AttentionShape(heads, kv, head_dim)


def _ffn_size(config: Any, adapter: ArchitectureAdapter) -> int:
    value = getattr(config, adapter.ffn_key, None)
    if value is None and adapter.family == "gpt2":  # GPT-2 leaves n_inner unset for the 4x default
        value = 4 * config.hidden_size
    return int(value)


# --------------------------------------------------------------------------------------------------
# Groups as index maps
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coupling:
    """One layer's share of every group: ``index[g]`` are the positions of group ``g`` along ``dim``
    of the layer's ``out x in`` weight view (0 = output rows, with the bias; 1 = input columns)."""

    layer: str
    dim: int
    index: torch.Tensor  # LongTensor [n_groups, per_group]


def _arange(n: int) -> torch.Tensor:
    # Index maps are CPU bookkeeping, also inside from_pretrained's ``torch.device("meta")`` context.
    return torch.arange(n, device="cpu")


def attention_couplings(adapter: ArchitectureAdapter, shape: AttentionShape) -> list[Coupling]:
    """Index maps of the attention groups for one block.

    Group ``g`` (a KV group) owns query heads ``g*r .. g*r+r-1`` (``r`` query heads per KV head):
    ``repeat_kv`` expands KV head ``j`` to the ``r`` consecutive query heads starting at ``j*r``.
    """
    d, r, n = shape.head_dim, shape.q_per_group, shape.groups
    per_head = _arange(d)
    groups = _arange(n)
    q_rows = groups[:, None] * (r * d) + _arange(r * d)[None, :]  # [n, r*d]
    kv_rows = groups[:, None] * d + per_head[None, :]  # [n, d]
    if adapter.layout == "separate":
        return [
            Coupling(adapter.q, 0, q_rows),  # type: ignore[arg-type]
            Coupling(adapter.k, 0, kv_rows),  # type: ignore[arg-type]
            Coupling(adapter.v, 0, kv_rows),  # type: ignore[arg-type]
            Coupling(adapter.o, 1, q_rows),
        ]
    if r != 1:  # fused layouts of supported families are MHA only
        raise ValueError(f"{adapter.family}: fused QKV with grouped-query attention is not supported")
    width = n * d
    if adapter.layout == "fused_blocks":
        rows = torch.cat([kv_rows, kv_rows + width, kv_rows + 2 * width], dim=1)
    elif adapter.layout == "fused_interleaved":
        rows = groups[:, None] * (3 * d) + _arange(3 * d)[None, :]
    else:  # pragma: no cover - guarded by the adapter table
        raise ValueError(f"unknown layout {adapter.layout!r}")
    return [Coupling(adapter.qkv, 0, rows), Coupling(adapter.o, 1, kv_rows)]  # type: ignore[arg-type]


def mlp_couplings(adapter: ArchitectureAdapter, channels: int) -> list[Coupling]:
    """Index maps of the MLP channels for one block (one position per channel and layer)."""
    idx = _arange(channels)[:, None]
    return [Coupling(name, 0, idx) for name in adapter.mlp_in] + [Coupling(adapter.mlp_out, 1, idx)]


def block_couplings(model: nn.Module) -> dict[str, list[Coupling]]:
    """``{"attn": [...], "mlp": [...]}``, valid for every decoder block of ``model``."""
    adapter = get_adapter(model)
    return {
        "attn": attention_couplings(adapter, attention_shape(model)),
        "mlp": mlp_couplings(adapter, _ffn_size(model.config, adapter)),
    }


def _is_conv1d(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def _out_in(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (weight-shaped) seen as ``out x in``: Conv1D stores ``in x out``."""
    return tensor.t() if _is_conv1d(module) else tensor
