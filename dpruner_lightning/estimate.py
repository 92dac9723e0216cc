"""How much memory a run needs, estimated from the model's config before anything is loaded.

:func:`estimate_memory` builds the model on the ``meta`` device (shapes, no storage), finds the
targets, and adds up, for the calibration passes:

* **weights**: every parameter in the model's dtype;
* **gradients**: one per target weight, in the model's dtype (gradient passes only; nothing else
  requires grad), or about two matrices' when the method consumes each gradient during the backward
  (:meth:`PruningMethod.gradient_bytes`);
* **method state**: what the method keeps per target (:meth:`PruningMethod.state_bytes`; D-PRUNER:
  the Taylor sums, G, S, the copy W0 and, for 16-bit models, the fp32 master weights). With the
  method's ``state_device: cpu`` it is in host memory: reported apart (``host_state``), and counted
  against the device only when the device is the CPU;
* **activations of one micro-batch**: per decoder layer ``b*s*h*(34 + 5*a*s/h)`` bytes at 16 bits
  (Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer Models"; the
  ``5*a*s/h`` term, the attention scores, only for eager attention: SDPA and flash attention do not
  keep them. For a 7B Llama at 4 x 2048 tokens the layers then take 36.5 GB and the logits 4.2 GB, against
  about 34.5 GB for both in the issue's reference on an H200: a 61 GB peak for forward+backward, minus
  the weights and the gradients), scaled
  to the activation dtype, or only each layer's input plus one layer with gradient checkpointing; plus
  the logits: ``b*s*V*(2*d + 12)`` (the logits and their gradient in the model's ``d`` bytes; the
  loss's fp32 log-probabilities, their gradient and the fp32 logits' gradient).

It is an estimate: allocator caching, the framework's workspace and fragmentation come on top, and
the CPU figure also holds the tokenised data and the Python runtime. :func:`check_fits` compares it
with the device's memory (and host state with the host's) and refuses, before any compute, a run that
cannot fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .algorithms.targets import find_targets
from .config import ModelSpec, TargetSpec
from .methods.base import PruningMethod
from .models import load_config, torch_dtype

log = logging.getLogger(__name__)


def size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes by kind. ``method_state`` is the state on the weights' device, ``host_state``
    the state the method keeps in host memory (``state_device: cpu``)."""

    weights: int
    gradients: int
    method_state: int
    activations: int
    host_state: int = 0

    @property
    def total(self) -> int:
        """Bytes on the weights' device (host state excluded)."""
        return self.weights + self.gradients + self.method_state + self.activations

    def on(self, device: torch.device) -> int:
        """Bytes the run needs on ``device``: the host state counts only when the device is the CPU."""
        return self.total + (self.host_state if torch.device(device).type == "cpu" else 0)

    def describe(self) -> str:
        host = f"; method state in host memory {size(self.host_state)}" if self.host_state else ""
        return (f"estimated peak {size(self.total)} = weights {size(self.weights)} + gradients {size(self.gradients)} + "
                f"method state {size(self.method_state)} + activations of one micro-batch {size(self.activations)}{host}")


def _activation_bytes(config, batch: int, seq_len: int, dtype_bytes: int, checkpointing: bool, grad: bool,
                      attention_scores: bool = True) -> int:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    vocab = getattr(config, "vocab_size", 0)
    scores = 5 * heads * seq_len / max(1, h) if attention_scores else 0.0  # the s x s scores, softmax, dropout mask
    per_layer = batch * seq_len * h * (34 + scores) * dtype_bytes / 2
    # the logits and their gradient in the model's dtype, the loss's fp32 log-probabilities, their gradient and
    # the fp32 logits' gradient (transformers computes the loss in fp32): all alive early in the backward
    logits = batch * seq_len * vocab * (2 * dtype_bytes + 3 * 4)
    if not grad:  # no graph kept: one layer's temporaries at a time
        return int(per_layer + logits / 2)
    if checkpointing:
        return int(layers * batch * seq_len * h * dtype_bytes + per_layer + logits)
    return int(layers * per_layer + logits)


def estimate_memory(spec: ModelSpec, method: PruningMethod, targets: TargetSpec, batch_size: int,
                    seq_len: int) -> Optional[MemoryEstimate]:
    """The run's estimated peak memory (see the module docstring), or None when the config cannot be
    read without loading the weights (a GGUF file)."""
    from transformers import AutoModelForCausalLM

    config = load_config(spec)
    if config is None:
        return None
    dtype = torch_dtype(spec.dtype)
    with torch.device("meta"):
        kwargs = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)  # its attention decides the activations
    found = find_targets(model, targets.target_modules, targets.exclude_modules)
    shapes = {n: t.shape for n, t in found.items()}
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    seen, weights = set(), 0
    for p in model.parameters():  # tied weights counted once
        if id(p) not in seen:
            seen.add(id(p))
            weights += p.numel() * dtype_bytes
    grad = method.has_gradient_pass()
    on_device, on_host = method.state_bytes_by_place(shapes, dtype_bytes)
    return MemoryEstimate(weights=weights, gradients=method.gradient_bytes(shapes, dtype_bytes),
                          method_state=on_device, host_state=on_host,
                          activations=_activation_bytes(config, batch_size, seq_len, dtype_bytes,
                                                        spec.gradient_checkpointing, grad, _stores_attention_scores(model)))


def _stores_attention_scores(model) -> bool:
    """Whether the model's attention keeps the ``s x s`` score matrices for the backward: eager attention
    does; SDPA and flash attention (transformers' default where available) recompute them blockwise."""
    return getattr(model.config, "_attn_implementation", None) in (None, "eager")


def available_bytes(device: torch.device) -> Optional[int]:
    """Total memory of a CUDA device, or the memory the OS says is available (Linux); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(estimate: Optional[MemoryEstimate], device: torch.device, what: str) -> None:
    """Log the estimate; raise ``ValueError`` (before any compute) when it exceeds the device's memory,
    or when the method's host state exceeds the host's. Only device bytes are compared with an
    accelerator's memory."""
    if estimate is None:
        log.info("memory estimate unavailable for %s (config not readable without the weights)", what)
        return
    device = torch.device(device)
    have = available_bytes(device)
    log.info("%s on %s: %s%s", what, device, estimate.describe(), f" (available {size(have)})" if have else "")
    if have is not None and estimate.on(device) > have:
        offload = "" if estimate.host_state or device.type == "cpu" else "model.method.init_args.state_device cpu, "
        raise ValueError(f"{what} will not fit on {device}: {estimate.describe()}, but only {size(have)} "
                         f"is available. Use {offload}model.model.dtype bfloat16, model.model.gradient_checkpointing true, "
                         "a smaller data.batch_size or data.seq_len, or a device with more memory")
    if device.type != "cpu" and estimate.host_state:
        host = available_bytes(torch.device("cpu"))
        if host is not None and estimate.host_state > host:
            raise ValueError(f"{what}: the method's state in host memory needs {size(estimate.host_state)}, but the "
                             f"host has only {size(host)} available. Use model.method.init_args.state_device auto (on "
                             f"{device}) or a machine with more memory")
