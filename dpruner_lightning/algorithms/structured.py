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
forward reads) lives in one :class:`ArchitectureAdapter` per family in :mod:`structured_arch`.

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

from .structured_arch import (  # noqa: F401  (re-exported: the public names of structured pruning)
    ArchitectureAdapter,
    AttentionShape,
    Coupling,
    _arange,
    _ffn_size,
    _is_conv1d,
    _out_in,
    attention_shape,
    block_couplings,
    get_adapter,
)
from .targets import find_decoder_blocks, find_targets

#: Key of the provenance record written into ``model.config`` by :func:`apply_structured_pruning_`.
CONFIG_RECORD = "structured_pruning"

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
