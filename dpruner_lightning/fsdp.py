"""The Lightning side of FSDP2: ``strategy: ModelParallelStrategy`` (with ``data_parallel_size`` = the
number of processes and ``tensor_parallel_size: 1``) shards the model in ``configure_model``; the
calibration passes then run as in :mod:`~dpruner_lightning.algorithms.sharding` (every rank reads every
micro-batch, accumulates its own rows, masks from the gathered scores). What is written is gathered
first, on every rank (collectives), and written by rank 0: the importance, and for the exports an
unsharded copy of the model built on rank 0 from the full state dict (in host memory).
"""

from __future__ import annotations

from typing import Mapping, Optional

import lightning as L
import torch
from torch import nn

from .algorithms.sharding import full_state_dict, full_tensor

try:
    from lightning.pytorch.strategies import ModelParallelStrategy
except ImportError:  # pragma: no cover - Lightning < 2.4
    ModelParallelStrategy = ()  # type: ignore[assignment,misc]


def fsdp_mesh(trainer: Optional[L.Trainer], module: L.LightningModule):
    """The 1-D mesh to shard over when ``trainer`` runs :class:`ModelParallelStrategy` (on one process too:
    a mesh of one rank runs the same FSDP2 code, which is how one GPU checks it), else None; refuses a
    tensor-parallel split (the passes need whole rows per rank)."""
    if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy):
        return None
    mesh = module.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise NotImplementedError(
            f"ModelParallelStrategy with tensor_parallel_size {mesh['tensor_parallel'].size()}: only FSDP is supported "
            f"here. Set data_parallel_size: {trainer.world_size} and tensor_parallel_size: 1 in the strategy's init_args.")
    return mesh["data_parallel"]


def gathered_artifacts(method, groups: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None) -> dict:
    """``method.artifacts()`` (or ``groups``) with every tensor gathered whole from the ranks' rows (a
    collective: every rank, same order); on one process the tensors as they are."""
    groups = method.artifacts() if groups is None else groups
    if not method.sharded:
        return dict(groups)
    return {g: {n: full_tensor(t, method.targets[n].weight).cpu() for n, t in tensors.items()} for g, tensors in groups.items()}


def unsharded_copy(model: nn.Module, rank: int) -> Optional[nn.Module]:
    """Rank 0: a plain copy of a sharded model, on the CPU, from its full state dict (a collective: call
    on every rank); other ranks: None."""
    state = full_state_dict(model)
    if rank != 0:
        return None
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(state.values())).dtype)
    copy.load_state_dict(state, strict=True, assign=True)
    return copy.eval()
