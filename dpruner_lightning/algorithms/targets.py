"""Which weight matrices are pruned, and uniform access to them.

A *target* is a linear layer inside the decoder blocks. Hugging Face models use two kinds:
``nn.Linear`` (weight is ``out x in``) and GPT-2's ``Conv1D`` (weight is ``in x out``). Every algorithm
in this package works on the ``out x in`` view returned by :meth:`Target.weight_view`, so nothing else
needs to know about ``Conv1D``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

try:  # transformers is a dependency, but keep the pure-torch layer importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

try:  # FSDP2 parameters and their gradients are DTensors
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = ()  # type: ignore[assignment]


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t`` when FSDP sharded it (a DTensor: a slice of rows), else ``t`` itself;
    either way in-place edits reach the parameter."""
    return t.to_local() if isinstance(t, DTensor) else t

log = logging.getLogger(__name__)

#: Default regex: linear layers inside numbered decoder blocks (``model.layers.3.mlp.up_proj``,
#: ``transformer.h.0.attn.c_attn``, ``gpt_neox.layers.1.attention.query_key_value`` ...).
DEFAULT_TARGETS = r".*\.\d+\..*"
#: Never pruned by default, even when inside a block: these stay dense in every published baseline.
DEFAULT_EXCLUDE = r".*(lm_head|embed|wte|wpe|norm|ln_).*"


@dataclass
class Target:
    """One prunable matrix: its dotted module name, the module, and whether it is a transposed Conv1D."""

    name: str
    module: nn.Module
    transposed: bool = False

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    def weight_view(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """``tensor`` (default: the weight) seen as ``out x in``; a view, so in-place edits reach the source.
        Under FSDP, this process's rows only (:func:`local_shard`): every accumulator, score and step
        of the algorithms is then shaped like the local slice."""
        t = local_shard(self.module.weight if tensor is None else tensor)
        return t.t() if self.transposed else t

    def grad_view(self) -> torch.Tensor:
        """The weight's gradient seen as ``out x in`` (like :meth:`weight_view`). Raises when there is none:
        ``weight_view(weight.grad)`` would then silently give the weight itself."""
        grad = self.module.weight.grad
        if grad is None:
            raise RuntimeError(f"target {self.name!r} has no gradient: no backward reached it since it was last freed")
        return self.weight_view(grad)

    def to_storage(self, tensor_out_in: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight_view` for a tensor laid out ``out x in``."""
        return tensor_out_in.t() if self.transposed else tensor_out_in

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` (under FSDP: of this process's rows)."""
        return tuple(self.weight_view().shape)  # type: ignore[return-value]

    @property
    def full_shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the whole matrix, sharded or not."""
        shape = tuple(self.module.weight.shape)
        return shape[::-1] if self.transposed else shape  # type: ignore[return-value]

    def numel(self) -> int:
        return self.module.weight.numel()


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def find_targets(
    model: nn.Module,
    target_modules: str | Iterable[str] | None = None,
    exclude_modules: str | Iterable[str] | None = None,
) -> dict[str, Target]:
    """Select the linear layers whose full dotted name matches a ``target_modules`` regex and no
    ``exclude_modules`` regex (full match, as in peft). Raises ``ValueError`` if nothing matches, or if
    a target's weight is shared with another module (tied embeddings: pruning one would zero both)."""
    include = _compile(target_modules if target_modules is not None else DEFAULT_TARGETS)
    exclude = _compile(exclude_modules if exclude_modules is not None else DEFAULT_EXCLUDE)
    targets: dict[str, Target] = {}
    linear_names, excluded = [], []
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        linear_names.append(name)
        if any(p.fullmatch(name) for p in include):
            if any(p.fullmatch(name) for p in exclude):
                excluded.append(name)
            else:
                targets[name] = Target(name, module, transposed=not isinstance(module, nn.Linear))
    # The message shows the patterns in force: a None in it would hide the default that excluded a layer.
    shown_exclude = (f"exclude_modules={exclude_modules!r}" if exclude_modules is not None
                     else f"exclude_modules=None, i.e. the default {DEFAULT_EXCLUDE!r}")
    if not targets:
        shown = ", ".join(linear_names[:8]) + (" ..." if len(linear_names) > 8 else "")
        why = (f" It selects {', '.join(excluded[:8])}, but all of them are excluded by {shown_exclude}: pass your own "
               "exclude_modules (e.g. '$^' excludes nothing) to prune them." if excluded else "")
        raise ValueError(
            f"target_modules={target_modules!r} ({shown_exclude}) matches no linear layer of this model.{why} "
            f"Its linear layers are named like: {shown or 'none found'}. "
            "Fix the regex (it must match the whole dotted name, e.g. '.*\\.mlp\\..*')."
        )
    if excluded and target_modules is not None and exclude_modules is None:
        log.warning("target_modules=%r also selects %s, left dense by the default exclude_modules %r; pass "
                    "exclude_modules to prune them", target_modules, ", ".join(excluded[:8]), DEFAULT_EXCLUDE)
    check_untied(model, targets)
    return targets


def check_untied(model: nn.Module, targets: dict[str, Target]) -> None:
    """Refuse a target whose weight is also another module's parameter (e.g. ``lm_head`` tied to the input
    embedding by ``tie_word_embeddings``): masking it in place would zero the other one too."""
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            owners.setdefault(id(param), []).append(full)
            if not param.is_meta and param.numel() > 0:  # separate Parameters over one storage count too
                owners.setdefault(-local_shard(param).data_ptr(), []).append(full)  # a DTensor's own is 0
    for name, target in targets.items():
        weight = target.weight
        keys = [id(weight)] + ([-local_shard(weight).data_ptr()] if not weight.is_meta and weight.numel() > 0 else [])
        others = sorted({o for k in keys for o in owners.get(k, ()) if o != f"{name}.weight"})
        if others:
            raise ValueError(
                f"target {name!r} shares its weight with {', '.join(others)} (tied weights): pruning it also zeroes "
                f"the embedding {others[0]}. Leave it out (exclude_modules or a narrower target_modules), or untie "
                "the weights with config_overrides: {tie_word_embeddings: false} in the model section."
            )


def _compile(patterns: str | Iterable[str]) -> list[re.Pattern]:
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as err:
            raise ValueError(f"invalid module regex {p!r}: {err}") from err
    return compiled


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder blocks (the longest ModuleList whose items hold linears).

    Works for Llama/Mistral/Qwen2 (``model.layers``), GPT-2 (``transformer.h``), OPT
    (``model.decoder.layers``), GPT-NeoX (``gpt_neox.layers``), BLOOM (``transformer.h``) without a
    per-architecture table."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if any(is_linear(m) for m in module[0].modules()):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    if best is None:
        raise ValueError(f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of blocks")
    return best


def block_index(target_name: str, blocks_prefix: str) -> int | None:
    """Index of the decoder block that holds ``target_name`` (``None`` if it is outside the blocks)."""
    m = re.match(re.escape(blocks_prefix) + r"\.(\d+)\.", target_name)
    return int(m.group(1)) if m else None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
