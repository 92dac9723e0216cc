"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS weight reconstruction.

Layer-wise problem: find a sparse ``W'`` minimising ``||W X - W' X||^2``. Pruning column ``j`` of a
row and updating the remaining (later) columns by ``-(w_j / [H^-1]_jj) * H^-1_{j,:}`` is the optimal
OBS step; doing the columns left to right lets every row share one sequence of inverse Hessians,
whose rows are exactly the rows of the upper Cholesky factor ``U`` of ``H^-1``. Columns are processed
in blocks: updates inside a block are applied eagerly, updates to later columns lazily (one matmul
per block), which is exact and much faster.

:func:`sequential_sparsegpt` applies this block after block through a decoder, each block's Hessians
being measured on the outputs of the already pruned previous blocks.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .hessian import InputStatistics, dead_inputs, inverse_hessian_cholesky
from .targets import Target, block_index, find_decoder_blocks

logger = logging.getLogger("dpruner_lightning.sparsegpt")


def _validate(shape: tuple[int, ...], sparsity: float, prune_n: int, prune_m: int) -> None:
    """Check the pruning pattern against an ``out x in`` weight shape; ``ValueError`` if invalid."""
    if prune_n or prune_m:
        if not 0 < prune_n < prune_m:
            raise ValueError(f"N:M sparsity needs 0 < n < m, got n={prune_n}, m={prune_m}")
        if shape[1] % prune_m:
            raise ValueError(f"N:M sparsity needs in_features ({shape[1]}) divisible by m={prune_m}")
    elif not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


@torch.no_grad()
def sparsegpt_prune_(
    W: Tensor,
    H: Tensor,
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
) -> Tensor:
    """Prune the ``out x in`` weight ``W`` in place with SparseGPT; return the keep-mask (True = kept).

    ``W`` may be a (transposed) view of a parameter: the result is written through it with ``copy_``,
    in its own dtype; all math is fp32. ``H`` is the layer Hessian of the inputs (``in x in``).
    Unstructured: in each block of ``block_size`` columns, the ``sparsity`` fraction of the block's
    weights (over all rows) with the lowest ``w^2 / d^2`` is pruned. N:M (``prune_n`` of every
    ``prune_m`` consecutive inputs, per row; ``sparsity`` ignored): chosen group by group with the same
    score. ``block_size`` is rounded down to a multiple of ``prune_m`` so groups never straddle blocks.
    Weights of dead inputs (``diag H == 0``) are zeroed; they score 0 so they are pruned first.
    """
    if W.dim() != 2 or tuple(H.shape) != (W.shape[1], W.shape[1]):
        raise ValueError(f"W must be out x in and H in x in; got W {tuple(W.shape)}, H {tuple(H.shape)}")
    _validate(tuple(W.shape), sparsity, prune_n, prune_m)
    nm = prune_m > 0
    if not nm and sparsity == 0.0:
        return torch.ones_like(W, dtype=torch.bool)
    if nm:
        block_size = max(prune_m, block_size // prune_m * prune_m)
    rows, cols = W.shape
    H = H.to(W.device)
    # row-major fp32 work copy (a transposed view would otherwise keep its column-major strides)
    Wf = W.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
    Wf[:, dead_inputs(H)] = 0.0  # those inputs are always zero: the weights are free to drop
    U = inverse_hessian_cholesky(H, damp)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wf[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        err = torch.zeros_like(W1)
        mask1 = torch.zeros(W1.shape, dtype=torch.bool, device=W1.device)
        if not nm:
            scores = (W1 * W1 / (d * d).unsqueeze(0)).flatten()
            k = int(scores.numel() * sparsity)
            # argsort, not a threshold, so ties cannot change the realised sparsity
            mask1.view(-1)[torch.argsort(scores)[:k]] = True
        for i in range(i2 - i1):
            if nm and i % prune_m == 0:
                group = W1[:, i : i + prune_m] ** 2 / (d[i : i + prune_m] ** 2).unsqueeze(0)
                low = torch.topk(group, prune_n, dim=1, largest=False).indices
                mask1.scatter_(1, low + i, True)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            e = (w - q) / d[i]
            # OBS compensation of the not-yet-processed columns of this block (row i of U1).
            W1[:, i:] -= e.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exact zero / unchanged value, free of round-off from the update above
            err[:, i] = e
        Wf[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        Wf[:, i2:] -= err @ U[i1:i2, i2:]  # lazy update of all later columns

    W.copy_(Wf.to(W.dtype))
    return ~pruned


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


@torch.no_grad()
def sequential_sparsegpt(
    model: nn.Module,
    targets: dict[str, Target],
    batches: list[Tensor],
    sparsity: float,
    prune_n: int = 0,
    prune_m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
    device: torch.device | str | None = None,
) -> dict[str, Tensor]:
    """Prune ``targets`` block by block with SparseGPT, each block calibrated on the outputs of the
    already pruned blocks before it. Returns the keep-masks (``out x in``) by target name.

    Every target must live inside the decoder blocks (``ValueError`` otherwise: outside them there is
    no block input to replay). With ``device`` set, each block is moved there while it is processed
    and moved back afterwards, and the activations stay on ``device`` (CPU-offloaded pruning).
    Only one set of block activations is alive at a time (outputs overwrite inputs).
    """
    prefix, blocks = find_decoder_blocks(model)
    per_block: dict[int, dict[str, Target]] = {}
    for name, target in targets.items():
        idx = block_index(name, prefix)
        if idx is None:
            raise ValueError(f"target {name!r} is outside the decoder blocks {prefix!r}; SparseGPT cannot prune it")
        per_block.setdefault(idx, {})[name] = target
    for target in targets.values():  # fail before any expensive work
        _validate(target.shape, sparsity, prune_n, prune_m)

    device = torch.device(device) if device is not None else None
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    masks: dict[str, Tensor] = {}
    try:
        model.eval()  # no dropout while measuring or propagating activations
        if config is not None:
            config.use_cache = False
        hidden, kwargs = capture_block_inputs(model, blocks, batches, device=device)
        logger.info("captured %d calibration batches at the input of %s", len(hidden), prefix)
        for i, block in enumerate(blocks):
            home = next(iter(block.parameters()), torch.empty(0)).device
            if device is not None:
                block.to(device)
            block_targets = per_block.get(i, {})
            if block_targets:
                with InputStatistics(block_targets, kind="hessian") as stats:
                    for h, kw in zip(hidden, kwargs):
                        block(h, **kw)
                for name, target in block_targets.items():
                    masks[name] = sparsegpt_prune_(
                        target.weight_view(), stats.hessian(name), sparsity, prune_n, prune_m, block_size, damp
                    )
                    logger.debug("pruned %s: %.3f sparse", name, 1.0 - masks[name].float().mean().item())
                del stats  # free the Hessians before the next block
            for j, (h, kw) in enumerate(zip(hidden, kwargs)):
                hidden[j] = _block_output(block(h, **kw))  # inputs of the next block, from the pruned one
            if device is not None:
                block.to(home)
            logger.info("block %d/%d: pruned %d targets", i + 1, len(blocks), len(block_targets))
    finally:
        model.train(was_training)
        if config is not None:
            config.use_cache = use_cache
    return masks
