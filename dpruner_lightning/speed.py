"""Measured speed and memory of a (pruned) causal LM: where sparsity pays off, and where it does not.

Zeros in a dense weight matrix cost exactly as much as any other value: a 50%-sparse model stored
densely runs at the dense model's speed. A speedup needs a kernel that skips the zeros. This module
times the same model, on the same seeded synthetic prompts and in the same process, with each backend:

* ``dense``: the model as is (the reference). **Structured pruning** (heads / channels removed) makes
  the model *smaller*: its speedup is simply ``dense`` on the pruned model vs ``dense`` on the original
  (``dpruner speed --model pruned/ --compare original/``); no sparse kernel is involved.
* ``csr``: every ``nn.Linear`` whose weight holds zeros becomes a :class:`SparseLinear` running
  ``torch.sparse.mm`` on a CSR copy of the weight (COO where CSR matmul lacks the dtype: CPU
  bfloat16 / float16), at the realised sparsity.
* ``semi_structured`` (CUDA, float16 / bfloat16): the linears whose weights satisfy 2:4 get
  ``torch.sparse.to_sparse_semi_structured`` weights (eager); ``semi_structured_compile`` is the
  same under ``torch.compile``. Elsewhere the row says ``unavailable: <reason>``: never skipped silently.

Phases: *prefill* = one forward over ``L`` prompt tokens (only the last position's logits, as
``generate`` does); *decode* = one new token on a KV cache of ``decode_context`` tokens (the cache
is cropped back after every step, outside the timer). Latency: median and inter-quartile range of
``repeats`` timed runs after ``warmup`` untimed ones. Memory: CUDA = ``max_memory_allocated`` peak
over the phase, minus what was allocated before it; CPU = peak resident set size over the phase
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) minus the resident set before it,
a lower bound since the allocator reuses memory it already holds.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import math
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch
from torch import nn

from .memory import KIND_DESCRIPTIONS, PeakMemory
from .semi_structured import is_2_4 as is_2_4  # `as`: re-exported (the 2:4 code moved to semi_structured)
from .semi_structured import semi_structured_linear
from .semi_structured import to_semi_structured as to_semi_structured

log = logging.getLogger(__name__)

BACKENDS = ("dense", "csr", "semi_structured", "semi_structured_compile")
_PROBED: dict[tuple[torch.dtype, str], str] = {}


@contextmanager
def _quiet_csr() -> Iterator[None]:
    """Silence torch's "sparse CSR support is in beta" warning: noise in a speed report."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        yield


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a CSR (else COO) sparse tensor, built from a dense Linear.

    The output is computed as ``(W @ x^T)^T`` because ``torch.sparse.mm`` wants the sparse operand on
    the left. The dense weight is not kept: the module's weight storage is values + indices only."""

    def __init__(self, linear: nn.Linear, layout: Optional[str] = None) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.layout = layout or sparse_layout_for(w.dtype, w.device)
        with _quiet_csr():
            sparse = w.to_sparse_csr() if self.layout == "csr" else w.to_sparse_coo().coalesce()
            if self.layout == "csr" and sparse.values().numel() < 2**31:
                # int32 indices: 8 instead of 12 bytes per kept fp32 value (50% sparse = dense size), and
                # MKL's int32 path is no slower
                sparse = torch.sparse_csr_tensor(sparse.crow_indices().int(), sparse.col_indices().int(),
                                                 sparse.values(), sparse.shape, check_invariants=False)
        self.register_buffer("weight", sparse, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)
        self.density = float(sparse.values().numel()) / max(1, w.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, flat.t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, layout={self.layout}, density={self.density:.3f}"


def sparse_layout_for(dtype: torch.dtype, device: torch.device | str) -> str:
    """``csr`` when ``torch.sparse.mm`` accepts a CSR matrix of this dtype on this device, else ``coo``
    (probed once on a 2x2 matrix: CPU CSR matmul goes through MKL, which has no bfloat16 / float16)."""
    key = (dtype, str(device))
    if key not in _PROBED:
        probe = torch.eye(2, dtype=dtype, device=device)
        try:
            with _quiet_csr():
                torch.sparse.mm(probe.to_sparse_csr(), probe)
            _PROBED[key] = "csr"
        except (RuntimeError, NotImplementedError):
            _PROBED[key] = "coo"
    return _PROBED[key]


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's representation: values + indices for sparse layouts and 2:4 tensors."""
    if t.layout == torch.sparse_csr:
        return sum(p.numel() * p.element_size() for p in (t.values(), t.crow_indices(), t.col_indices()))
    if t.layout == torch.sparse_coo:
        return sum(p.numel() * p.element_size() for p in (t._values(), t._indices()))
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
        names, _ = t.__tensor_flatten__()  # semi-structured: packed values + metadata (+ transposes)
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    """Weight storage of the model (parameters and buffers; tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        data = t.data if isinstance(t, nn.Parameter) else t
        key = id(data) if data.layout != torch.strided or hasattr(data, "__tensor_flatten__") else data.data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(data)
    return total


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


@contextmanager
def _swapped(model: nn.Module, replacements: Mapping[str, nn.Module]) -> Iterator[nn.Module]:
    """Put ``replacements`` in place of the named modules, and the originals back afterwards (so one
    model serves every backend without a copy of its dense weights)."""
    originals: dict[str, nn.Module] = {}
    try:
        for name, new in replacements.items():
            parent, attr = _parent(model, name)
            originals[name] = getattr(parent, attr)
            setattr(parent, attr, new)
        yield model
    finally:
        for name, old in originals.items():
            parent, attr = _parent(model, name)
            setattr(parent, attr, old)


def _sparse_linears(model: nn.Module, min_sparsity: float = 0.0) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` whose weight holds zeros, at least a ``min_sparsity`` fraction of them."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            zeros = float((m.weight == 0).float().mean())
            if zeros > 0 and zeros >= min_sparsity:
                out[name] = m
    return out


def hardware() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    import transformers

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "platform": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,  # other work skews timings
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(step: Callable[[], Any], reset: Callable[[], None], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds of ``repeats`` calls of ``step`` after ``warmup`` untimed ones (``reset`` runs untimed before each)."""
    for _ in range(warmup):
        reset()
        step()
    times = []
    for _ in range(repeats):
        reset()
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _crop(cache: Any, length: int) -> None:
    """Back to ``length`` cached tokens (a negative count removes tokens in every transformers version)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _stats(times: Sequence[float], tokens: int) -> dict[str, float]:
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [med, med, med]
    return {"median_s": med, "iqr_s": q[2] - q[0], "tokens_per_s": tokens / med if med > 0 else math.inf}


def _backend_model(model: nn.Module, backend: str, min_sparsity: float) -> tuple[dict[str, nn.Module], str]:
    """Replacement modules for ``backend`` and a note; raises ``RuntimeError('unavailable: ...')``."""
    if backend == "dense":
        return {}, "the model as is"
    p = next(model.parameters())
    if backend.startswith("semi_structured") and p.device.type != "cuda":
        raise RuntimeError("unavailable: semi-structured sparse kernels are CUDA-only")
    sparse = _sparse_linears(model, min_sparsity)
    if not sparse:
        raise RuntimeError(f"unavailable: no nn.Linear weight is at least {min_sparsity:.0%} zeros")
    if backend == "csr":
        new = {n: SparseLinear(m) for n, m in sparse.items()}
        layouts = sorted({m.layout for m in new.values()})
        return new, f"{len(new)} linears as {'/'.join(layouts)}"
    if backend.startswith("semi_structured"):
        if p.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"unavailable: semi-structured kernels need float16/bfloat16 weights, model is {p.dtype}")
        new, skipped = {}, []
        for n, m in sparse.items():
            try:
                new[n] = semi_structured_linear(n, m)
            except RuntimeError as err:
                skipped.append(str(err))
        if not new:
            raise RuntimeError(f"unavailable: no linear convertible ({skipped[0] if skipped else 'none 2:4'})")
        return new, f"{len(new)} linears 2:4, {len(skipped)} left dense"
    raise ValueError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")


def seeded_prompts(vocab: int, lengths: Sequence[int], batch_size: int, seed: int, device: torch.device) -> dict[int, torch.Tensor]:
    """``{length: [batch, length] token ids}`` drawn once from ``seed`` (the same for every model and backend)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randint(0, vocab, (batch_size, n), generator=gen).to(device) for n in sorted(set(lengths))}


def phase_step(run: Callable[..., Any], model: nn.Module, phase: str, n: int, prompts: Mapping[int, torch.Tensor],
               ) -> tuple[Callable[[], None], Callable[[], None], dict[str, Any]]:
    """``(step, reset, state)`` of one timed phase: ``prefill`` = one forward over ``n`` prompt tokens;
    ``decode`` = one token on a KV cache of ``n`` tokens (``reset`` crops the cache back, untimed). Like
    ``generate``, only the last position's logits are computed where the model allows it. ``state["out"]``
    holds the last output. Raises ``RuntimeError('unavailable: ...')`` for a cache that cannot be cropped."""
    params = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.x renamed it
    if phase == "prefill":
        ids = prompts[n] if n in prompts else prompts[max(prompts)][:, :n]
        state: dict[str, Any] = {}
        return (lambda: state.__setitem__("out", run(input_ids=ids, use_cache=False, **keep))), (lambda: None), state
    ids = prompts[n + 1]
    state = {"cache": getattr(run(input_ids=ids[:, :-1], use_cache=True, **keep), cache_kw, None)}
    if not hasattr(state["cache"], "crop"):
        raise RuntimeError("unavailable: the model's KV cache cannot be cropped between steps")
    step = lambda: state.__setitem__(  # noqa: E731
        "out", run(input_ids=ids[:, -1:], use_cache=True, **{cache_kw: state["cache"]}, **keep))
    return step, (lambda: _crop(state["cache"], n)), state


@torch.inference_mode()
def measure_speed(model: nn.Module, tokenizer_or_vocab_size: Union[int, Any, None] = None, *,
                  prefill_lengths: Sequence[int] = (512, 2048), decode_context: int = 512, batch_size: int = 1,
                  repeats: int = 10, warmup: int = 2, backends: Sequence[str] = BACKENDS, seed: int = 0,
                  min_sparsity: float = 0.1, label: str = "model") -> dict[str, Any]:
    """Latency (median, IQR), tokens/s and peak memory of prefill and decode for each backend.

    ``tokenizer_or_vocab_size``: a tokenizer (its ``len``) or a vocabulary size, capped at the model's
    embedding size (default: that size). Prompt ids are drawn once from ``seed``; every backend runs on
    them. Sparse backends convert the linears with at least ``min_sparsity`` zeros (default 10%: an
    ``lm_head`` tied to an embedding with a few quantisation zeros stays dense).
    Returns ``{"label", "hardware", "protocol", "model", "rows"}``; each row has ``backend``,
    ``phase`` (prefill / decode / ``-`` for an unavailable backend), ``tokens``, ``status`` (``ok`` or
    ``unavailable: <reason>``), and for ``ok`` rows ``median_s``, ``iqr_s``, ``tokens_per_s``,
    ``speed_vs_dense`` (dense median / this median: < 1 means slower), ``peak_memory_bytes``,
    ``weight_bytes``, ``output_shape`` and ``max_abs_diff_vs_dense`` (last-position logits)."""
    p = next(model.parameters())
    device = p.device
    vocab = model.get_input_embeddings().num_embeddings
    if isinstance(tokenizer_or_vocab_size, int):
        vocab = min(vocab, tokenizer_or_vocab_size)
    elif tokenizer_or_vocab_size is not None:
        vocab = min(vocab, len(tokenizer_or_vocab_size))
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    prompts = seeded_prompts(vocab, [int(n) for n in prefill_lengths] + [decode_context + 1], batch_size, seed, device)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    sparse = _sparse_linears(model)
    zeros = sum(int((m.weight == 0).sum()) for m in sparse.values())
    all_lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    result: dict[str, Any] = {
        "label": label, "hardware": hardware(),
        "protocol": {"prefill_lengths": list(prefill_lengths), "decode_context": decode_context, "batch_size": batch_size,
                     "repeats": repeats, "warmup": warmup, "seed": seed, "device": str(device), "dtype": str(p.dtype),
                     "memory": None, "logits_to_keep": keep.get("logits_to_keep"), "min_sparsity": min_sparsity},
        "model": {"parameters": sum(t.numel() for t in model.parameters()), "weight_bytes": model_bytes(model),
                  "linears_with_zeros": len(sparse),
                  "sparsity_of_all_linears": zeros / max(1, sum(m.weight.numel() for m in all_lin))},
        "rows": [],
    }
    dense_med: dict[tuple[str, int], float] = {}
    reference: Optional[torch.Tensor] = None
    ref_len = -1
    for backend in backends:
        try:
            replacements, note = _backend_model(model, backend, min_sparsity)
        except RuntimeError as err:
            status = str(err) if str(err).startswith("unavailable") else f"unavailable: {err}"
            result["rows"].append({"backend": backend, "phase": "-", "tokens": 0, "status": status})
            log.info("%s: %s", backend, status)
            continue
        with _swapped(model, replacements):
            run = torch.compile(model) if backend.endswith("_compile") else model
            weight_bytes = model_bytes(model)
            for phase, n in [("prefill", n) for n in prefill_lengths] + [("decode", decode_context)]:
                row: dict[str, Any] = {"backend": backend, "phase": phase, "tokens": n, "note": note}
                if max_pos and (n + (phase == "decode")) > max_pos:
                    row["status"] = f"unavailable: {n} tokens exceed the model's {max_pos} positions"
                    result["rows"].append(row)
                    continue
                try:
                    step, reset, state = phase_step(run, model, phase, n, prompts)
                    with PeakMemory(device) as memory:
                        times = _time(step, reset, repeats, warmup, device)
                    result["protocol"]["memory"] = f"{KIND_DESCRIPTIONS[memory.kind]}, increase over the phase"
                    row.update(_stats(times, batch_size * (n if phase == "prefill" else 1)))
                    row.update(status="ok", peak_memory_bytes=memory.delta_bytes, weight_bytes=weight_bytes,
                               output_shape=list(state["out"].logits.shape))
                except Exception as err:  # a backend failing (e.g. under torch.compile) is a result, not a crash
                    msg = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
                    row["status"] = msg if msg.startswith("unavailable") else f"unavailable: {type(err).__name__}: {msg}"
                    result["rows"].append(row)
                    log.warning("%s %s %d: %s", backend, phase, n, row["status"])
                    continue
                last = state["out"].logits[:, -1].float()
                if backend == "dense" and phase == "prefill" and reference is None:
                    reference, ref_len = last.clone(), n
                if reference is not None and phase == "prefill" and n == ref_len:
                    row["max_abs_diff_vs_dense"] = float((last - reference).abs().max())
                if backend == "dense":
                    dense_med[(phase, n)] = row["median_s"]
                if (phase, n) in dense_med:
                    row["speed_vs_dense"] = dense_med[(phase, n)] / row["median_s"]
                result["rows"].append(row)
                log.info("%s %s %d: median %.4f s, %.1f tok/s", backend, phase, n, row["median_s"], row["tokens_per_s"])
    return result


def linear_flops(tokens: int, in_features: int, out_features: int, density: float = 1.0) -> float:
    """Multiply-adds x 2 of ``tokens`` rows through an ``out x in`` weight; a sparse kernel does
    only the ``density`` fraction of them."""
    return 2.0 * tokens * in_features * out_features * density


@torch.inference_mode()
def linear_timings(model: nn.Module, *, tokens: int = 512, backends: Sequence[str] = ("dense", "csr", "semi_structured"),
                   repeats: int = 10, warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """One linear per distinct weight shape of the pruned targets (default: the decoder linears), timed
    on ``tokens`` input rows with each backend, beside its theoretical FLOPs and weight bytes (dense:
    ``out*in`` values; sparse: values + indices of the actual representation). ``speed_vs_dense`` =
    dense median / backend median (< 1 means slower)."""
    from .algorithms.targets import find_targets

    try:
        linears = {n: t.module for n, t in find_targets(model).items() if isinstance(t.module, nn.Linear)}
    except ValueError:
        linears = {}
    linears = linears or {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, m in linears.items():
        shapes.setdefault(tuple(m.weight.shape), []).append(name)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for (out_f, in_f), names in shapes.items():
        lin = linears[names[0]]
        device = lin.weight.device
        x = torch.randn(tokens, in_f, generator=gen).to(device=device, dtype=lin.weight.dtype)
        density = float((lin.weight != 0).float().mean())
        base = {"shape": [out_f, in_f], "count": len(names), "example": names[0], "density": density, "tokens": tokens}
        dense_med = None
        for backend in backends:
            row = dict(base, backend=backend)
            try:
                if backend == "dense":
                    module, wbytes, flops = lin, tensor_bytes(lin.weight), linear_flops(tokens, in_f, out_f)
                elif backend == "csr":
                    module = SparseLinear(lin)
                    wbytes, flops = tensor_bytes(module.weight), linear_flops(tokens, in_f, out_f, module.density)
                elif backend.startswith("semi_structured"):
                    module = semi_structured_linear(names[0], lin)
                    wbytes, flops = tensor_bytes(module.weight), linear_flops(tokens, in_f, out_f, 0.5)
                else:
                    raise ValueError(f"unknown backend {backend!r}")
                times = _time(lambda: module(x), lambda: None, repeats, warmup, device)
            except RuntimeError as err:
                row["status"] = f"unavailable: {str(err).splitlines()[0][:200]}"
                rows.append(row)
                continue
            row.update(_stats(times, tokens), status="ok", flops=flops, weight_bytes=wbytes)
            row["gflops_per_s"] = flops / row["median_s"] / 1e9
            dense_med = row["median_s"] if backend == "dense" else dense_med
            if dense_med:
                row["speed_vs_dense"] = dense_med / row["median_s"]
            rows.append(row)
    return {"hardware": hardware(), "tokens": tokens, "repeats": repeats, "warmup": warmup, "rows": rows}
