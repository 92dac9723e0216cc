"""LLM-Pruner-style structured pruning (Ma et al., NeurIPS 2023), without the LoRA recovery stage.

Whole *groups* of coupled weights are removed, so the pruned model is genuinely smaller (weight
shapes shrink and ``model.config`` is rewritten), unlike the masks of the unstructured methods:

* attention group = one head: its rows of q, k, v (and their biases) and its columns of the output
  projection. With grouped-query attention a group is one *KV group*: one k/v head and every query
  head that reads it, so the ``num_attention_heads / num_key_value_heads`` ratio stays valid;
* MLP group = one intermediate channel: its row of every input projection (gate and up, or fc1 ...)
  with its bias, and its column of the output projection.

Importance of a group (first-order Taylor, "element-wise, summed"): ``sum |g * W|`` over all its
weights and biases, where ``g`` is the LM-loss gradient summed over calibration batches (see
:func:`accumulate_gradients` / :func:`calibration_gradients`). Every block is pruned at the same
ratio so the Hugging Face config (one head count and one intermediate size for all layers) can
describe the result.

Typical use::

    grads = calibration_gradients(model, batches)            # or accumulate_gradients() in a loop
    imp = group_importance(model, grads)
    ratio = ratio_for_target_fraction(model, 0.2)            # optional: match a parameter budget
    plan = plan_structured_pruning(imp, ratio)
    apply_structured_pruning_(model, plan)
    model.save_pretrained(path); load_structured_pruned(path)

Per-architecture knowledge (projection names, fused-QKV layout, config keys, module attributes the
forward reads) lives in one :class:`ArchitectureAdapter` per family in :data:`ADAPTERS`.

Reload caveat (transformers 5.x): Llama/Mistral/Qwen2 attention reads ``config.head_dim``, so a
head-pruned model reloads with plain ``AutoModelForCausalLM.from_pretrained``. OPT, GPT-2 and
GPT-NeoX attention derive their width from ``hidden_size`` (``head_dim = hidden_size // heads``,
q/k/v sized ``hidden_size``), so no config can describe fewer heads: plain ``from_pretrained`` then
fails loudly (size mismatch or "divisible" error), and :func:`load_structured_pruned` must be used.
MLP-only pruning (``attention=False``) of those families reloads with plain ``from_pretrained``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .targets import Conv1D, find_decoder_blocks, find_targets

#: Key of the provenance record written into ``model.config`` by :func:`apply_structured_pruning_`.
CONFIG_RECORD = "structured_pruning"

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
    q: str | None  #: separate layout only
    k: str | None
    v: str | None
    qkv: str | None  #: fused layouts only
    o: str
    mlp: str  #: the module holding the MLP attributes ("" = the block itself, as in OPT)
    mlp_in: tuple[str, ...]
    mlp_out: str
    ffn_key: str  #: config key of the intermediate size
    has_kv_heads: bool  #: config has ``num_key_value_heads`` (GQA possible)
    config_expresses_heads: bool  #: attention width comes from ``config.head_dim`` (reload works)
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
    qkv=None,
    o="self_attn.o_proj",
    mlp="mlp",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    ffn_key="intermediate_size",
    has_kv_heads=True,
    config_expresses_heads=True,
    # The forward reads head_dim (unchanged) and num_key_value_groups (unchanged: whole KV groups go).
    attn_attrs=(),
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
    qkv=None,
    o="self_attn.out_proj",
    mlp="",
    mlp_in=("fc1",),
    mlp_out="fc2",
    ffn_key="ffn_dim",
    has_kv_heads=False,
    config_expresses_heads=False,
    attn_attrs=(("num_heads", "heads"),),  # OPTAttention.forward: view(bsz, -1, num_heads, head_dim)
)
_GPT2 = ArchitectureAdapter(
    family="gpt2",
    model_types=("gpt2",),
    layout="fused_blocks",
    attn="attn",
    q=None,
    k=None,
    v=None,
    qkv="attn.c_attn",
    o="attn.c_proj",
    mlp="mlp",
    mlp_in=("mlp.c_fc",),
    mlp_out="mlp.c_proj",
    ffn_key="n_inner",
    has_kv_heads=False,
    config_expresses_heads=False,
    # GPT2Attention.forward: c_attn(x).split(split_size); num_heads kept in sync for readers.
    attn_attrs=(("num_heads", "heads"), ("split_size", "width")),
)
_NEOX = ArchitectureAdapter(
    family="gpt_neox",
    model_types=("gpt_neox",),
    layout="fused_interleaved",
    attn="attention",
    q=None,
    k=None,
    v=None,
    qkv="attention.query_key_value",
    o="attention.dense",
    mlp="mlp",
    mlp_in=("mlp.dense_h_to_4h",),
    mlp_out="mlp.dense_4h_to_h",
    ffn_key="intermediate_size",
    has_kv_heads=False,
    config_expresses_heads=False,
    attn_attrs=(),  # GPTNeoXAttention.forward only reads head_size (unchanged); heads are "-1"
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


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------


def structured_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``named_parameters``) of every weight and bias that belongs to some group."""
    adapter = get_adapter(model)
    prefix, blocks = find_decoder_blocks(model)
    names = []
    for b, block in enumerate(blocks):
        for layer in (*adapter.attn_layers(), *adapter.mlp_layers()):
            module = block.get_submodule(layer)
            names.append(f"{prefix}.{b}.{layer}.weight")
            if getattr(module, "bias", None) is not None:
                names.append(f"{prefix}.{b}.{layer}.bias")
    return names


@torch.no_grad()
def accumulate_gradients(
    model: nn.Module, grads: dict[str, torch.Tensor] | None = None, names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Add each parameter's current ``.grad`` into ``grads`` (fp32, created on first call) and return it.

    Call after every calibration ``backward()`` (then zero the grads). ``names`` defaults to
    :func:`structured_parameter_names`; parameters without a gradient are skipped.
    """
    grads = {} if grads is None else grads
    wanted = set(structured_parameter_names(model) if names is None else names)
    for name, p in model.named_parameters():
        if name in wanted and p.grad is not None:
            g = p.grad.detach().float()
            if name in grads:
                grads[name].add_(g)
            else:
                grads[name] = g.clone()
    return grads


def calibration_gradients(model: nn.Module, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """Sum of LM-loss gradients over ``batches`` for every grouped parameter.

    A batch is an ``input_ids`` LongTensor or a mapping of model inputs (``labels`` default to
    ``input_ids``: the causal-LM loss, as in LLM-Pruner). The model runs in eval mode (no dropout:
    importance should not depend on a dropout draw); its mode and ``.grad`` fields are restored.
    """
    names = structured_parameter_names(model)
    params = dict(model.named_parameters())
    saved_grads = {n: p.grad for n, p in params.items()}
    saved_flags = {n: p.requires_grad for n, p in params.items()}
    was_training = model.training
    grads: dict[str, torch.Tensor] = {}
    try:
        model.eval()
        wanted = set(names)
        for n, p in params.items():  # only grouped parameters need gradients: saves memory
            p.requires_grad_(n in wanted)
            p.grad = None
        seen = 0
        for batch in batches:
            inputs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
            inputs.setdefault("labels", inputs["input_ids"])
            loss = model(**inputs).loss
            loss.backward()
            accumulate_gradients(model, grads, names)
            for n in names:
                params[n].grad = None
            seen += 1
        if seen == 0:
            raise ValueError("calibration_gradients got no batch")
    finally:
        for n, p in params.items():
            p.requires_grad_(saved_flags[n])
            p.grad = saved_grads[n]
        model.train(was_training)
    return grads


# --------------------------------------------------------------------------------------------------
# Importance
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _position_scores(module: nn.Module, name: str, dim: int, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-position ``sum |g * W|`` along ``dim`` of one layer (plus ``|g_b * b|`` for output rows)."""
    if f"{name}.weight" not in grads:
        raise KeyError(f"no accumulated gradient for {name}.weight: run accumulate_gradients after backward()")
    w = _out_in(module, module.weight).float()
    g = _out_in(module, grads[f"{name}.weight"]).to(w.device, torch.float32)
    score = (g * w).abs_().sum(dim=1 - dim)
    bias = getattr(module, "bias", None)
    if dim == 0 and bias is not None:
        gb = grads.get(f"{name}.bias")
        if gb is None:
            raise KeyError(f"no accumulated gradient for {name}.bias")
        score += (gb.to(w.device, torch.float32) * bias.float()).abs_()
    return score


@torch.no_grad()
def group_importance(model: nn.Module, grads: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """First-order Taylor importance of every group: ``{block: {"attn": [groups], "mlp": [channels]}}``.

    ``grads`` maps parameter names to gradients summed over calibration batches. A group's score is
    the sum of ``|g * W|`` over all its weights and biases across the coupled layers (the output
    projection's bias belongs to no group and is kept). Scores are fp32 on CPU.
    """
    prefix, blocks = find_decoder_blocks(model)
    couplings = block_couplings(model)
    result: dict[int, dict[str, torch.Tensor]] = {}
    for b, block in enumerate(blocks):
        result[b] = {}
        for kind, cps in couplings.items():
            total = torch.zeros(cps[0].index.shape[0], dtype=torch.float32)
            for cp in cps:
                scores = _position_scores(block.get_submodule(cp.layer), f"{prefix}.{b}.{cp.layer}", cp.dim, grads)
                total += scores.cpu()[cp.index].sum(dim=1)
            result[b][kind] = total
    return result


# --------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------


def n_removed(ratio: float, n: int) -> int:
    """Groups removed out of ``n`` at ``ratio``: ``round(ratio * n)`` (half up), keeping at least one."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"structured pruning ratio must be in [0, 1); got {ratio}")
    return min(n - 1, int(math.floor(ratio * n + 0.5)))


@dataclass
class StructuredPlan:
    """Sorted indices of the kept attention groups and MLP channels of each block."""

    keep_attn: dict[int, torch.Tensor]
    keep_mlp: dict[int, torch.Tensor]
    ratio: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def kept_counts(self) -> tuple[int, int]:
        """``(attention groups, MLP channels)`` kept per block; raises if blocks differ."""
        attn = {int(v.numel()) for v in self.keep_attn.values()}
        mlp = {int(v.numel()) for v in self.keep_mlp.values()}
        if len(attn) != 1 or len(mlp) != 1:
            raise ValueError(
                f"non-uniform plan (kept attention groups {sorted(attn)}, channels {sorted(mlp)}): a Hugging "
                "Face config needs the same head count and intermediate size in every block"
            )
        return attn.pop(), mlp.pop()


def _keep_highest(scores: torch.Tensor, remove: int) -> torch.Tensor:
    # Stable sort: among equal scores the lower index is removed first, so plans are deterministic.
    order = torch.sort(scores, stable=True).indices
    return torch.sort(order[remove:]).values


def plan_structured_pruning(
    importance: Mapping[int, Mapping[str, torch.Tensor]],
    ratio: float,
    *,
    attention: bool = True,
    mlp: bool = True,
) -> StructuredPlan:
    """Remove the ``round(ratio * n)`` least important attention groups and MLP channels of every block.

    ``attention=False`` / ``mlp=False`` keep that part dense (e.g. MLP-only pruning of OPT/GPT-2/NeoX,
    which then reloads with plain ``from_pretrained``).
    """
    keep_attn, keep_mlp = {}, {}
    for b, imp in importance.items():
        a, m = imp["attn"], imp["mlp"]
        keep_attn[b] = _keep_highest(a, n_removed(ratio, a.numel()) if attention else 0)
        keep_mlp[b] = _keep_highest(m, n_removed(ratio, m.numel()) if mlp else 0)
    return StructuredPlan(keep_attn, keep_mlp, ratio, {"attention": attention, "mlp": mlp})


def _target_weight_total(model: nn.Module, target_modules: Any, exclude_modules: Any) -> int:
    return sum(t.numel() for t in find_targets(model, target_modules, exclude_modules).values())


def _per_group_weights(model: nn.Module) -> tuple[int, int, int, int]:
    """``(attn groups, weights per attn group, channels, weights per channel)`` for one block
    (weight elements only, the unit unstructured sparsity counts)."""
    _, blocks = find_decoder_blocks(model)
    block = blocks[0]
    out = []
    for cps in block_couplings(model).values():
        per = 0
        for cp in cps:
            other = _out_in(block.get_submodule(cp.layer), block.get_submodule(cp.layer).weight).shape[1 - cp.dim]
            per += cp.index.shape[1] * other
        out += [cps[0].index.shape[0], per]
    return out[0], out[1], out[2], out[3]


def removed_target_fraction(
    model: nn.Module,
    ratio: float,
    *,
    attention: bool = True,
    mlp: bool = True,
    target_modules: Any = None,
    exclude_modules: Any = None,
) -> float:
    """Fraction of TARGET weights (decoder-block linears, :func:`find_targets` defaults) that a plan at
    ``ratio`` removes. Biases are left out of both counts, as unstructured sparsity ignores them."""
    _, blocks = find_decoder_blocks(model)
    g, per_g, c, per_c = _per_group_weights(model)
    removed = (n_removed(ratio, g) * per_g if attention else 0) + (n_removed(ratio, c) * per_c if mlp else 0)
    return len(blocks) * removed / _target_weight_total(model, target_modules, exclude_modules)


def ratio_for_target_fraction(
    model: nn.Module,
    fraction: float,
    *,
    attention: bool = True,
    mlp: bool = True,
    target_modules: Any = None,
    exclude_modules: Any = None,
) -> float:
    """The uniform ratio whose plan removes the fraction of TARGET weights closest to ``fraction``
    (to compare with unstructured methods "at the same number of parameters removed").

    ``round(ratio * n)`` is a step function, so every attainable plan is reached by a ratio halfway
    between consecutive rounding breakpoints ``(k + 0.5) / n``; all of them are tried.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1); got {fraction}")
    _, blocks = find_decoder_blocks(model)
    g, per_g, c, per_c = _per_group_weights(model)
    total = _target_weight_total(model, target_modules, exclude_modules)
    points = sorted({0.0} | {(k + 0.5) / n for n in (g, c) for k in range(n) if (k + 0.5) / n < 1.0})
    candidates = [0.0] + [(a + b) / 2 for a, b in zip(points, points[1:])] + [(points[-1] + 1.0) / 2]
    best, best_err = 0.0, math.inf
    for r in candidates:
        removed = (n_removed(r, g) * per_g if attention else 0) + (n_removed(r, c) * per_c if mlp else 0)
        err = abs(len(blocks) * removed / total - fraction)
        if err < best_err - 1e-12:  # first (smallest) ratio wins ties
            best, best_err = r, err
    return best


# --------------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------------


def _positions(cp: Coupling, keep: torch.Tensor) -> torch.Tensor:
    """Sorted positions of the kept groups: sorting keeps fused layouts ([q|k|v] blocks, per-head
    interleaving) intact because each group's positions are in layout order."""
    return torch.sort(cp.index[keep].reshape(-1)).values


@torch.no_grad()
def _shrink_(module: nn.Module, dim: int, keep: torch.Tensor) -> None:
    """Keep positions ``keep`` along ``dim`` (out x in view) of a Linear/Conv1D, in place.

    The parameters are replaced (same dtype, device, requires_grad) but the module object stays, so
    references held elsewhere (targets, hooks) remain valid.
    """
    conv = _is_conv1d(module)
    storage_dim = (1 - dim) if conv else dim
    w = module.weight
    idx = keep.to(w.device)
    module.weight = nn.Parameter(w.index_select(storage_dim, idx).clone(), requires_grad=w.requires_grad)
    if dim == 0 and getattr(module, "bias", None) is not None:
        b = module.bias
        module.bias = nn.Parameter(b.index_select(0, idx).clone(), requires_grad=b.requires_grad)
    size = int(idx.numel())
    if conv:  # Conv1D.forward reads nf (out); nx is informational
        if dim == 0:
            module.nf = size
        else:
            module.nx = size
    elif dim == 0:
        module.out_features = size
    else:
        module.in_features = size


@torch.no_grad()
def apply_structured_pruning_(model: nn.Module, plan: StructuredPlan) -> nn.Module:
    """Physically remove the groups not kept by ``plan``; update module attributes and ``model.config``.

    Afterwards ``config.num_attention_heads`` / ``num_key_value_heads`` / the intermediate-size key hold
    the new counts, ``config.head_dim`` is set explicitly (``hidden_size`` is unchanged, so it can no
    longer be derived), and ``config.structured_pruning`` records the original sizes (used by
    :func:`load_structured_pruned`). Returns ``model``.
    """
    adapter = get_adapter(model)
    _, blocks = find_decoder_blocks(model)
    if set(plan.keep_attn) != set(range(len(blocks))) or set(plan.keep_mlp) != set(range(len(blocks))):
        raise ValueError(f"plan covers blocks {sorted(plan.keep_attn)}, the model has {len(blocks)}")
    kept_groups, kept_channels = plan.kept_counts()
    if kept_groups < 1 or kept_channels < 1:
        raise ValueError("a plan must keep at least one attention group and one MLP channel per block")
    shape = attention_shape(model)
    couplings = block_couplings(model)
    new = AttentionShape(kept_groups * shape.q_per_group, kept_groups, shape.head_dim)
    values = {
        "heads": new.heads,
        "kv_heads": new.kv_heads,
        "width": new.heads * new.head_dim,
        "channels": kept_channels,
    }
    for b, block in enumerate(blocks):
        for kind, keep in (("attn", plan.keep_attn[b]), ("mlp", plan.keep_mlp[b])):
            if torch.unique(keep).numel() != keep.numel():
                raise ValueError(f"block {b}: duplicate {kind} indices in the plan")
            for cp in couplings[kind]:
                _shrink_(block.get_submodule(cp.layer), cp.dim, _positions(cp, keep.cpu()))
        for path, attrs in ((adapter.attn, adapter.attn_attrs), (adapter.mlp, adapter.mlp_attrs)):
            module = block.get_submodule(path) if path else block
            for attr, key in attrs:
                if hasattr(module, attr):
                    setattr(module, attr, values[key])
    _update_config_(model.config, adapter, shape, new, kept_channels, plan)
    return model


def _update_config_(
    config: Any,
    adapter: ArchitectureAdapter,
    old: AttentionShape,
    new: AttentionShape,
    channels: int,
    plan: StructuredPlan,
) -> None:
    """Write the new sizes (and the provenance record) into ``config``."""
    record = dict(getattr(config, CONFIG_RECORD, None) or {})
    # Keep the first record's originals: the loader rebuilds from them when the config cannot.
    record.setdefault("family", adapter.family)
    record.setdefault("original_num_attention_heads", old.heads)
    record.setdefault("original_num_key_value_heads", old.kv_heads)
    record.setdefault(f"original_{adapter.ffn_key}", _ffn_size(config, adapter))
    record.update(
        method="llm_pruner_taylor",
        ratio=float(plan.ratio),
        num_attention_heads=new.heads,
        num_key_value_heads=new.kv_heads,
        head_dim=new.head_dim,
        intermediate_size=channels,
        # False where the attention class derives its width from hidden_size (OPT, GPT-2, GPT-NeoX).
        reloadable_with_from_pretrained=adapter.config_expresses_heads
        or new.heads == record["original_num_attention_heads"],
    )
    config.num_attention_heads = new.heads
    if adapter.has_kv_heads:
        config.num_key_value_heads = new.kv_heads
    config.head_dim = new.head_dim
    setattr(config, adapter.ffn_key, channels)
    setattr(config, CONFIG_RECORD, record)


# --------------------------------------------------------------------------------------------------
# Reloading
# --------------------------------------------------------------------------------------------------


def load_structured_pruned(path: str, **kwargs: Any) -> nn.Module:
    """Load a model saved after :func:`apply_structured_pruning_` (or any causal LM); ``kwargs`` go to
    ``from_pretrained`` (``dtype``, ``device_map`` ...).

    When the config describes the pruned shapes (Llama family, or no head removed) this is plain
    ``AutoModelForCausalLM.from_pretrained``. Otherwise (head-pruned OPT / GPT-2 / GPT-NeoX) the
    model class is built from the original head count and shrunk to the saved shapes inside
    ``__init__``, so ``from_pretrained`` itself loads the weights: its key renaming, dtype, device
    placement and weight tying all apply unchanged.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    record = getattr(config, CONFIG_RECORD, None)
    if not record or record.get("reloadable_with_from_pretrained", True):
        return AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = _shrinking_subclass(base).from_pretrained(path, config=config, **kwargs)
    model.__class__ = base  # the subclass only differs in __init__: hand back the plain class
    return model


def _shrinking_subclass(base: type) -> type:
    """``base`` whose ``__init__`` builds the original-size model, then shrinks it to the pruned
    config (arbitrary kept indices: ``from_pretrained`` overwrites every value afterwards)."""

    def __init__(self, config, *args, **kwargs):  # noqa: N807 - it is an __init__
        record = dict(getattr(config, CONFIG_RECORD))
        adapter = get_adapter(config)
        skeleton = copy.deepcopy(config)
        skeleton.num_attention_heads = record["original_num_attention_heads"]
        if adapter.has_kv_heads:
            skeleton.num_key_value_heads = record["original_num_key_value_heads"]
        base.__init__(self, skeleton, *args, **kwargs)
        n_blocks = len(find_decoder_blocks(self)[1])
        groups, channels = _arange(record["num_key_value_heads"]), _arange(_ffn_size(config, adapter))
        blocks = range(n_blocks)
        plan = StructuredPlan({b: groups for b in blocks}, {b: channels for b in blocks}, record["ratio"])
        apply_structured_pruning_(self, plan)
        setattr(self.config, CONFIG_RECORD, record)

    # Same name, so save_pretrained still writes the real class into config.architectures.
    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__})
