"""Calibration passes on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP each rank holds a slice of rows of every target weight (``Shard(0)`` of the ``out x in``
matrix) and, after a backward, the matching slice of the gradient, *averaged over the ranks*. The
importance sums are not linear in the gradient (Taylor sums of ``g * W`` per micro-batch, S, the
proximal step), so averaging the gradients of different micro-batches would change them. The passes
therefore feed **the same micro-batch to every rank**: the averaged gradient is then that micro-batch's
gradient, exactly, and each rank accumulates the statistics of its own rows. FSDP here buys memory (the
weights, gradients and accumulators are split N ways), not throughput.

Masks are chosen on whole matrices (per-matrix, per-row, N:M and global thresholds are then exactly the
ones of one process): :func:`full_tensor` gathers a score matrix from the ranks' slices, every rank
chooses the same masks, and :func:`local_rows` keeps the rank's rows for the in-place multiply.

Only ``nn.Linear`` targets (rows = output features) are supported: GPT-2's ``Conv1D`` stores ``in x
out`` and FSDP would split its input features.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .targets import DTensor, local_shard


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter or gradient)."""
    return isinstance(t, DTensor)


def model_is_sharded(model: nn.Module) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def all_reduce_sum_(t: torch.Tensor) -> None:
    """In-place sum over the default process group, for tensors on any device (gloo sums CPU tensors;
    NCCL only device ones, so host tensors go through the device of the current rank)."""
    import torch.distributed as dist

    if t.device.type == "cpu" and dist.get_backend() == "nccl":
        on_device = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device)
        t.copy_(on_device)
    else:
        dist.all_reduce(t)


def full_tensor(local_part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor from every rank's ``local_part``, laid out like the sharded parameter ``like``
    (a collective: call it on every rank in the same order). ``local_part`` is returned as it is when
    ``like`` is not sharded."""
    if not is_sharded(like):
        return local_part
    part = local_part.to(local_shard(like).device).contiguous()  # state kept on the CPU goes to the mesh's device
    return DTensor.from_local(part, like.device_mesh, like.placements,
                              shape=like.shape, stride=like.stride()).full_tensor()


def local_rows(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole`` (identical on every rank), laid out like ``like``; no communication."""
    if not is_sharded(like):
        return whole
    from torch.distributed.tensor import distribute_tensor

    whole = whole.to(local_shard(like).device)  # the mesh's device
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None).to_local()


def realised_sparsity_sharded(model: nn.Module, target_weights: dict[str, torch.Tensor]) -> dict:
    """:func:`~dpruner_lightning.algorithms.masks.realised_sparsity` of a sharded model: every rank counts
    the zeros of its slices, one all-reduce totals them (a parameter FSDP left whole counts once)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    local_zeros = [float((local_shard(w) == 0).sum()) for w in target_weights.values()]
    all_zeros = sum(float((local_shard(p) == 0).sum()) / (1 if is_sharded(p) else world) for p in model.parameters())
    counts = torch.tensor(local_zeros + [all_zeros], dtype=torch.float64)
    all_reduce_sum_(counts)
    totals = [w.numel() for w in target_weights.values()]  # a DTensor's numel is the whole matrix's
    all_total = sum(p.numel() for p in model.parameters())
    return {
        "targets": float(counts[:-1].sum()) / max(1, sum(totals)),
        "all_parameters": round(float(counts[-1])) / max(1, all_total),
        "target_parameters": sum(totals),
        "all_parameter_count": all_total,
        "per_matrix": {n: float(counts[i]) / max(1, totals[i]) for i, n in enumerate(target_weights)},
    }


def check_shardable(targets: Iterable[tuple[str, nn.Module]]) -> None:
    """Refuse targets whose storage is not ``out x in`` (FSDP would split their input features)."""
    bad = [name for name, module in targets if not isinstance(module, nn.Linear)]
    if bad:
        raise NotImplementedError(
            f"FSDP calibration supports nn.Linear targets only; {len(bad)} target(s) are not, e.g. {bad[0]!r} "
            "(GPT-2's Conv1D stores in x out, and FSDP would split its input features). Run this model on one "
            "process or with strategy: ddp."
        )


def shard_model(model: nn.Module, blocks: Iterable[nn.Module], mesh) -> nn.Module:
    """``fully_shard`` each decoder block, then the root (embeddings, final norm, head): one all-gather
    per block in the forward and backward, resharded after use, so a rank holds one block unsharded at a
    time on top of its slices."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on the CPU, on every rank (a collective), for saving from rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
