"""LLM-Pruner (Ma et al., NeurIPS 2023), structured, WITHOUT its LoRA recovery stage.

One ``backward`` pass over the calibration set sums the LM-loss gradients of every grouped weight and
bias; a group's importance is the first-order Taylor term ``sum |g * W|`` over its coupled weights
(an attention KV group with all its query heads, or one MLP channel). :meth:`LLMPruner.prune` removes
the least important groups of every decoder block at one uniform ratio, chosen so that the fraction of
TARGET weights removed is as close as possible to the requested sparsity (the same budget the
unstructured methods zero). Shapes really shrink and ``model.config`` is rewritten.

The module's targets keep pointing at the same (shrunk in place) layers, so the realised "sparsity" of
a structured run is reported against the parameter counts recorded before pruning. Reloading the
exported folder: plain ``AutoModelForCausalLM.from_pretrained`` for the Llama family (and for MLP-only
pruning of any family); :func:`~dpruner_lightning.algorithms.structured.load_structured_pruned` in
general (head-pruned OPT / GPT-2 / GPT-NeoX).
"""

from __future__ import annotations

from typing import Literal, Mapping

import torch
from torch import nn

from ..algorithms.masks import parse_granularity
from ..algorithms.structured import (
    apply_structured_pruning_,
    get_adapter,
    group_importance,
    plan_structured_pruning,
    ratio_for_target_fraction,
    structured_parameter_names,
)
from ..algorithms.targets import Target, find_decoder_blocks
from ..config import MaskSpec
from .base import CalibrationPass, PruningMethod


class LLMPrunerMethod(PruningMethod):
    name = "llm_pruner"
    default_granularity = "layer"  # only used to read the sparsity; the real unit is a group
    #: Removes whole groups (shapes shrink) instead of returning masks: the Lightning layer then skips
    #: mask checks and reports sparsity against the parameter counts from before pruning.
    structured = True

    def __init__(self, source: Literal["general", "domain"] = "domain", attention: bool = True, mlp: bool = True,
                 state_device: Literal["auto", "cpu"] = "auto") -> None:
        """
        Args:
            source: which calibration set the gradients are taken on.
            attention: prune attention groups (heads / KV groups).
            mlp: prune MLP channels. ``attention=False`` keeps every head, so the exported folder of
                OPT / GPT-2 / GPT-NeoX also reloads with plain ``from_pretrained``.
            state_device: where the fp32 gradient sums live: ``auto`` (each parameter's device) or ``cpu``.
        """
        super().__init__()
        if source not in ("general", "domain"):
            raise ValueError(f"source must be 'general' or 'domain'; got {source!r}")
        if not (attention or mlp):
            raise ValueError("LLM-Pruner needs attention=True or mlp=True (otherwise nothing can be removed)")
        self.source, self.attention, self.mlp = source, attention, mlp
        self.configure_state_device(state_device)
        self.importance: dict[int, dict[str, torch.Tensor]] = {}
        self._grads: dict[str, torch.Tensor] = {}
        self._names: list[str] = []
        self._params: dict[str, nn.Parameter] = {}

    def scoring_passes(self) -> list[CalibrationPass]:
        return [CalibrationPass("calibration", self.source, "backward")]

    def check_mask_spec(self, spec: MaskSpec) -> None:
        """Only a sparsity makes sense for whole-group removal (called when the module is built)."""
        kind, _, _ = parse_granularity(spec.resolved_granularity(self.default_granularity))
        if kind != "layer" or spec.allocation != "uniform":
            raise ValueError(
                "LLM-Pruner removes whole heads/channels at one ratio in every block: use mask.granularity "
                f"'auto' and allocation 'uniform' (got granularity {spec.granularity!r}, allocation {spec.allocation!r})"
            )

    def prepare(self, model: nn.Module, targets: Mapping[str, Target]) -> None:
        super().prepare(model, targets)
        adapter = get_adapter(model)  # NotImplementedError for an unsupported family, before any compute
        prefix, blocks = find_decoder_blocks(model)
        grouped = {f"{prefix}.{b}.{layer}" for b in range(len(blocks)) for layer in (*adapter.attn_layers(), *adapter.mlp_layers())}
        if grouped != set(self.targets):
            raise ValueError(
                "LLM-Pruner removes whole groups from every attention and MLP projection of every block, so "
                "its targets must be exactly those layers (the default target_modules/exclude_modules); "
                f"differing layers: {sorted(grouped ^ set(self.targets))[:6]}"
            )

    def start_pass(self, p: CalibrationPass) -> None:
        self._grads = {}
        self._names = structured_parameter_names(self.model)
        # Biases of grouped layers count in the group's importance: the module only enables the
        # target weights' gradients, so enable the biases here (disabled again in end_pass).
        params = dict(self.model.named_parameters())
        self._params = {name: params[name] for name in self._names}
        for param in self._params.values():
            param.requires_grad_(True)
        if self.consumes_in_backward:
            self.hook_gradients(self._params, self._accumulate)

    @torch.no_grad()
    def after_backward(self, p: CalibrationPass) -> dict[str, float]:
        for name in self._names:  # what no hook consumed during the backward
            if self._params[name].grad is not None:
                self._accumulate(name)
        return {}

    @torch.no_grad()
    def _accumulate(self, name: str) -> None:
        """Add one parameter's micro-batch gradient to its fp32 sum, then free it (the module's optimizer
        only zeroes the target weights')."""
        param = self._params[name]
        if name not in self._grads:
            self._grads[name] = self.new_state(param)  # fp32 sum on the state device
        self._grads[name].add_(param.grad.to(self._grads[name].device))
        param.grad = None

    def consumes_every_gradient_in_backward(self) -> bool:
        return self.consumes_in_backward

    def reduce_across_ranks(self, p: CalibrationPass, all_reduce_sum) -> None:
        all_reduce_sum = self.state_collective(all_reduce_sum)
        for name in self._names:  # gradient sums of all ranks' micro-batches (same names, same order everywhere)
            if name in self._grads:
                all_reduce_sum(self._grads[name])

    def end_pass(self, p: CalibrationPass) -> None:
        if not self._grads:
            raise RuntimeError("LLM-Pruner saw no gradient: its calibration pass must run backward")
        self.importance = group_importance(self.model, self._grads)
        self._grads = {}  # one fp32 copy of every grouped parameter: free it as soon as possible
        self.unhook_gradients()
        for param in self._params.values():
            param.requires_grad_(False)

    def artifacts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"group_importance": {f"block{b}.{kind}": t for b, imp in self.importance.items() for kind, t in imp.items()}}

    @torch.no_grad()
    def prune(self, spec: MaskSpec) -> dict[str, torch.Tensor]:
        """Remove the groups; returns no masks (the weights that remain are all kept)."""
        self.check_mask_spec(spec)
        if not self.importance:
            raise RuntimeError("LLM-Pruner has no group importance: run its calibration pass first")
        fraction = spec.target_sparsity(self.default_granularity)
        ratio = ratio_for_target_fraction(self.model, fraction, attention=self.attention, mlp=self.mlp)
        plan = plan_structured_pruning(self.importance, ratio, attention=self.attention, mlp=self.mlp)
        groups, channels = plan.kept_counts()
        apply_structured_pruning_(self.model, plan)
        self.plan_summary = {"ratio": ratio, "kept_attention_groups_per_block": groups, "kept_mlp_channels_per_block": channels}
        return {}

    def __repr__(self) -> str:
        return f"LLMPrunerMethod(source={self.source!r}, attention={self.attention}, mlp={self.mlp})"
