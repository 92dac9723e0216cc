"""Block-by-block (sequential) layer-wise solving through a decoder, as SparseGPT does it.

The decoder blocks are processed in model order. For block ``i`` the calibration activations are those
produced by the blocks before it *after* they were solved (pruned and/or reconstructed), so every block
corrects the error its predecessors left, and only one set of block activations is alive at a time.
For every target inside the block a layer Hessian ``H = (2/n) sum x x^T`` is measured on its inputs and
handed to a per-matrix ``solve(name, target, H)`` that returns the target's keep-mask (SparseGPT's
prune-and-update, or the reconstruction of kept weights for a given mask, :mod:`.reconstruct`).

Several calibration sets can share one solve with weights: the Hessian is then
``sum_s w_s H_s`` over per-token means, e.g. ``(1 - beta) H_domain + beta H_general``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .hessian import InputStatistics
from .targets import Target, block_index, find_decoder_blocks

log = logging.getLogger(__name__)

#: ``solve(name, target, H) -> keep-mask``: changes ``target``'s weight in place.
Solve = Callable[[str, Target, Tensor], Tensor]

class _StopForward(Exception):
    """Raised inside the first block to end the forward pass once its inputs are captured."""


def _to(obj: Any, device: torch.device | None) -> Any:
    """Detach tensors (recursively in tuples/lists/dicts) and move them to ``device``."""
    if isinstance(obj, Tensor):
        obj = obj.detach()
        return obj if device is None else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    param = emb.weight if emb is not None else next(model.parameters())
    return param.device


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[Tensor],
    device: torch.device | str | None = None,
) -> tuple[list[Tensor], list[dict]]:
    """Run ``model`` on each batch (``input_ids``, or a dict of model inputs) up to the first decoder
    block and return, per batch, that block's hidden states and all its other call arguments as a
    kwargs dict (masks, position ids/embeddings, ...), so that ``blocks[0](h, **kw)`` replays the call.

    Architecture-agnostic: a pre-hook on ``blocks[0]`` binds the real call to the block's signature
    (positional extras become keywords) and aborts the forward. The model runs on the device of its
    input embeddings with ``use_cache=False`` in eval mode; results are moved to ``device`` if given.
    """
    block = blocks[0]
    signature = inspect.signature(block.forward)
    first = next(iter(signature.parameters))  # name of the hidden-states parameter
    device = torch.device(device) if device is not None else None
    hidden: list[Tensor] = []
    kwargs_list: list[dict] = []

    def hook(module, args, kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        call: dict[str, Any] = {}
        for pname, value in bound.items():
            kind = signature.parameters[pname].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                call.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                raise TypeError(f"{type(module).__name__}.forward takes *args; cannot replay its inputs")
            else:
                call[pname] = value
        hidden.append(_to(call.pop(first), device))
        kwargs_list.append(_to(call, device))
        raise _StopForward

    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    was_training = model.training
    in_device = _input_device(model)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        if config is not None:
            config.use_cache = False
        model.eval()
        for batch in batches:
            inputs = dict(batch) if isinstance(batch, Mapping) else {"input_ids": batch}
            try:
                model(**_to(inputs, in_device), use_cache=False)
            except _StopForward:
                continue
            raise RuntimeError("the first decoder block was never called during the forward pass")
    finally:
        handle.remove()
        model.train(was_training)
        if config is not None:
            config.use_cache = use_cache
    return hidden, kwargs_list


def _block_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out



def weighted_sets(
    batches: Sequence[Tensor], extra: Sequence[Tensor] | None = None, extra_weight: float = 0.0
) -> list[tuple[list[Tensor], float]]:
    """``[(batches, 1 - beta), (extra, beta)]`` without empty or zero-weight sets; checks ``beta``."""
    if not 0.0 <= extra_weight <= 1.0:
        raise ValueError(f"the Hessian mix weight must be in [0, 1]; got {extra_weight}")
    if extra_weight > 0 and not extra:
        raise ValueError("a Hessian mix weight > 0 needs the second calibration set's batches")
    sets = [(list(batches), 1.0 - extra_weight), (list(extra or []), extra_weight)]
    sets = [(b, w) for b, w in sets if w > 0 and b]
    if not sets:
        raise ValueError("no calibration batches to measure the layer Hessians on")
    return sets


def _mixed_hessians(block: nn.Module, targets: dict[str, Target], states: list[tuple[list, list]],
                    weights: Sequence[float]) -> dict[str, Tensor]:
    """Run ``block`` on each set's activations and mix the per-token-mean Hessians with ``weights``.
    Targets that share an input (q/k/v, gate/up) share the result tensor."""
    mixed: dict[int, Tensor] = {}
    out: dict[str, Tensor] = {}
    per_set = []
    for (hidden, kwargs), w in zip(states, weights):
        with InputStatistics(targets, kind="hessian") as stats:
            for h, kw in zip(hidden, kwargs):
                block(h, **kw)
        per_set.append((stats, w))
    for name in targets:
        key = tuple(id(stats.hessian(name)) for stats, _ in per_set)
        if key not in mixed:
            if len(per_set) == 1:
                mixed[key] = per_set[0][0].hessian(name)
            else:
                mixed[key] = sum(w * stats.hessian(name) for stats, w in per_set)
        out[name] = mixed[key]
    return out


@torch.no_grad()
def sequential_blockwise(
    model: nn.Module,
    targets: Mapping[str, Target],
    sets: Sequence[tuple[list[Tensor], float]],
    solve: Solve,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Solve every target block by block; returns the keep-masks ``solve`` returned, by target name.

    ``sets``: ``(batches, weight)`` pairs (see :func:`weighted_sets`); every set's activations are pushed
    through the solved blocks. Every target must live inside the decoder blocks (``ValueError``
    otherwise: outside them there is no block input to replay). With ``device`` set, each block is
    moved there while it is processed and moved back afterwards, and the activations stay on
    ``device`` (CPU-offloaded pruning).
    """
    prefix, blocks = find_decoder_blocks(model)
    per_block: dict[int, dict[str, Target]] = {}
    for name, target in targets.items():
        idx = block_index(name, prefix)
        if idx is None:
            raise ValueError(f"target {name!r} is outside the decoder blocks {prefix!r}; it cannot be solved block by block")
        per_block.setdefault(idx, {})[name] = target

    device = torch.device(device) if device is not None else None
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    masks: dict[str, Tensor] = {}
    try:
        model.eval()  # no dropout while measuring or propagating activations
        if config is not None:
            config.use_cache = False
        states = [capture_block_inputs(model, blocks, batches, device=device) for batches, _ in sets]
        weights = [w for _, w in sets]
        log.info("captured %s calibration batches at the input of %s", "+".join(str(len(b)) for b, _ in sets), prefix)
        for i, block in enumerate(blocks):
            home = next(iter(block.parameters()), torch.empty(0)).device
            if device is not None:
                block.to(device)
            block_targets = per_block.get(i, {})
            if block_targets:
                hessians = _mixed_hessians(block, block_targets, states, weights)
                for name, target in block_targets.items():
                    masks[name] = solve(name, target, hessians[name])
                del hessians  # free the Hessians before the next block
            for hidden, kwargs in states:
                for j, (h, kw) in enumerate(zip(hidden, kwargs)):
                    hidden[j] = _block_output(block(h, **kw))  # inputs of the next block, from the solved one
            if device is not None:
                block.to(home)
            log.info("block %d/%d: solved %d targets", i + 1, len(blocks), len(block_targets))
    finally:
        model.train(was_training)
        if config is not None:
            config.use_cache = use_cache
    return masks
