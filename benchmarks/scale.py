"""Calibration passes at a real model's shape: speed against a bare loop, and peak memory against the estimate.

Builds a causal LM of a named shape with random weights (``random:llama`` with the shape's config), runs
the method's calibration passes and its mask selection through ``Trainer.fit`` (the module and its
callbacks: everything a real run does), and, in the same process and on the same batches, the bare
PyTorch loop each pass is built on (forward+backward for a gradient pass, forward+backward+SGD step
for D-PRUNER's dual pass, forward only for a forward pass). Prints, per pass::

    tokens_per_s <pass> ours <tok/s> bare <tok/s>
    ratio <pass> <ours seconds / bare seconds>

``ratio`` is best-of-N wall time (the ratio of each repeat is printed too); ``cpu_ratio`` the same with
process CPU seconds; ``step_seconds`` the median step of each side (ours: forward, backward, the
method's per-step hooks and its update), which leaves out the once-per-pass work, and ``step_ratio`` their
ratio (the steady state). Then
``mask_seconds <s>`` and ``peak <GiB> estimate <GiB>``: the largest per-phase peak of
:class:`~dpruner_lightning.memory.PeakMemory` (passes and masks; the smallest over repeats) over what
was in use before the model was loaded (on the CPU: the process's resident set, so the Python runtime,
the libraries and the data are left out, as in the estimate), and
:func:`~dpruner_lightning.estimate.estimate_memory` for the same run on that device (with
``--accumulators cpu`` on an accelerator, the host state is printed apart). Timings on a machine shared
with other work are noisy: ``--threads 1`` is steadier there.

    python benchmarks/scale.py                                    # llama-100m, bf16, CPU: about 2 minutes on 2 cores
    python benchmarks/scale.py --shape llama-2-7b --device cuda --tokens 64 --seq-len 512 --batch-size 1
    python benchmarks/scale.py --shape llama-3-8b --device cuda --accumulators cpu --checkpointing
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import statistics
import time
from typing import Optional

import torch
from calibration_timing import BARE_DESCRIPTION, BARE_MODE, PassClock, bare_loop_times, fit_ours

from dpruner_lightning.config import ModelSpec, TargetSpec
from dpruner_lightning.data import CalibrationDataModule
from dpruner_lightning.estimate import estimate_memory
from dpruner_lightning.memory import PeakMemory, release_memory
from dpruner_lightning.methods import METHODS, make_method
from dpruner_lightning.models import load_causal_lm
from dpruner_lightning.quiet import install_known_filters

#: ``random:llama`` configs of each shape (the published models' sizes; weights are random).
SHAPES: dict[str, dict] = {
    # a few seconds: the test's shape
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=257, max_position_embeddings=256),
    # 110M parameters (85M in the targets), embeddings tied as in GPT-2 small
    "llama-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
}
GIB = 2**30


def build_method(args: argparse.Namespace):
    """The registered method ``args.method`` (``args.lr``: its ``alpha``, if it has one); ``--accumulators cpu``
    sets ``state_device: cpu``, ``--kernels`` and ``--general-dtype`` their settings (parse_args refuses
    each for a method without that setting)."""
    kwargs = {}
    if args.accumulators == "cpu":
        kwargs["state_device"] = "cpu"
    if args.kernels != "auto":
        kwargs["kernels"] = args.kernels
    if args.general_dtype != "float32":
        kwargs["general_dtype"] = args.general_dtype
    if "alpha" in _settings(args.method):
        kwargs["alpha"] = args.lr
    return make_method(args.method, **kwargs)


def _settings(method: str):
    """The names of a registered method's settings (its ``__init__`` parameters)."""
    return inspect.signature(METHODS[method].__init__).parameters


def _accelerator(args: argparse.Namespace) -> str:
    return "gpu" if args.device.startswith("cuda") else "cpu"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-100m")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--tokens", type=int, default=32,
                    help="calibration sequences per pass (default 32: 16 steps, so the once-per-pass work weighs as "
                         "in a run, not as in a pass of a few steps)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--method", choices=sorted(METHODS), default="d_pruner")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in ours and the bare loop")
    ap.add_argument("--accumulators", choices=["device", "cpu"], default="device",
                    help="where the method keeps its accumulators, W0 and fp32 masters (state_device)")
    ap.add_argument("--kernels", choices=["auto", "eager", "compiled"], default="auto",
                    help="D-PRUNER's per-step arithmetic: fused torch.compile kernels or eager ops (auto: compiled on CUDA)")
    ap.add_argument("--general-dtype", choices=["float32", "weights"], default="float32",
                    help="D-PRUNER's G during the dual pass: fp32 or the model's dtype (2 bytes less per target weight)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N for every timing")
    ap.add_argument("--lr", type=float, default=3e-4, help="SGD learning rate of the dual pass and its bare loop")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice); 1 is steadier on a machine other work shares")
    args = ap.parse_args(argv)
    for name in ("tokens", "seq_len", "batch_size", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    settings = _settings(args.method)
    if args.accumulators == "cpu" and "state_device" not in settings:
        ap.error(f"--accumulators cpu: {args.method} keeps no accumulators to move (it has no state_device setting)")
    for flag, default in (("kernels", "auto"), ("general_dtype", "float32")):
        if getattr(args, flag) != default and flag not in settings:
            ap.error(f"--{flag.replace('_', '-')}: {args.method} has no {flag} setting")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu)")
    if args.seq_len > SHAPES[args.shape]["max_position_embeddings"]:
        ap.error(f"--seq-len {args.seq_len} exceeds the shape's {SHAPES[args.shape]['max_position_embeddings']} positions")
    return args


def run_ours(spec: ModelSpec, dm: CalibrationDataModule, args: argparse.Namespace):
    """One fit; returns (module, its PassClock, bytes in use before the model was loaded)."""
    base, clock = {}, PassClock()

    def before_fit() -> None:
        release_memory()
        base["bytes"] = PeakMemory(args.device).start().start_bytes

    module = fit_ours(spec, dm, build_method(args), accelerator=_accelerator(args), before_fit=before_fit, callbacks=[clock])
    return module, clock, base["bytes"]


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the benchmark and print its lines; returns what it printed, as numbers."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    install_known_filters()
    torch.manual_seed(0)
    spec = ModelSpec(name_or_path="random:llama", tokenizer="bytes", config_overrides=dict(SHAPES[args.shape]),
                     dtype=args.dtype, gradient_checkpointing=args.checkpointing)
    vocab = SHAPES[args.shape]["vocab_size"]
    general = torch.randint(0, vocab, (args.tokens, args.seq_len))
    domain = torch.randint(0, vocab, (args.tokens, args.seq_len))
    blocks = {"general": general, "domain": domain}
    dm = CalibrationDataModule.from_token_blocks(general, domain, general[:1], domain[:1], batch_size=args.batch_size)
    device = torch.device(args.device)

    bare_loop_times(spec, general[: args.batch_size], args.batch_size, "fb", args.lr, device)  # warm-up (kernels, allocator)
    # Our warm-up: one fit of the tiny shape in the same dtype compiles the fused kernels (kernels: compiled,
    # or auto on CUDA) once for the process, as a user's first run does; printed apart, not in the ratios.
    t0 = time.perf_counter()
    tiny = ModelSpec(name_or_path="random:llama", tokenizer="bytes", config_overrides=dict(SHAPES["tiny"]), dtype=args.dtype)
    few = torch.randint(0, SHAPES["tiny"]["vocab_size"], (2, 16))
    fit_ours(tiny, CalibrationDataModule.from_token_blocks(few, few, few[:1], few[:1], batch_size=1), build_method(args),
             accelerator=_accelerator(args))
    warmup_seconds = time.perf_counter() - t0
    ours: dict[str, list[tuple[float, float]]] = {}  # pass -> (wall, cpu) per repeat
    bare: dict[str, list[tuple[float, float]]] = {}
    steps: dict[str, tuple[list[float], list[float]]] = {}  # pass -> (ours, bare) wall seconds of every step
    peaks, mask_seconds = [], []
    for _ in range(args.repeats):  # interleaved, so a burst of other work on the machine hits both sides
        module, clock, base = run_ours(spec, dm, args)
        passes = [p for p in module.method.passes() if p.mode in BARE_MODE]
        for p in passes:
            ours.setdefault(p.name, []).append((clock.wall[p.name], clock.cpu[p.name]))
            steps.setdefault(p.name, ([], []))[0].extend(clock.steps.get(p.name, []))
        mask_seconds.append(module.phase_seconds.get("mask", math.nan))
        in_backward = module.method.gradients_final_in_backward  # as the fit decided (the estimate counts on it)
        peaks.append(max(module.peak_memory.values()) - base)
        del module
        release_memory()
        model = load_causal_lm(spec).to(device)  # one bare model per repeat, loaded once ours is gone
        for p in passes:
            bare.setdefault(p.name, []).append(bare_loop_times(spec, blocks[p.source], args.batch_size, BARE_MODE[p.mode],
                                                               args.lr, device, steps=steps[p.name][1], model=model))
        del model
        release_memory()

    method = build_method(args)
    method.gradients_final_in_backward = in_backward
    estimate = estimate_memory(spec, method, TargetSpec(), args.batch_size, args.seq_len)
    tokens = args.tokens * args.seq_len
    print(f"shape {args.shape}, {args.dtype} on {device}, method {args.method}, {args.tokens} x {args.seq_len} tokens per "
          f"pass, micro-batch {args.batch_size}, checkpointing {args.checkpointing}, accumulators {args.accumulators}, "
          f"kernels {args.kernels}, G {args.general_dtype}, {torch.get_num_threads()} threads, best of {args.repeats}")
    out: dict = {"ratio": {}, "cpu_ratio": {}, "tokens_per_s": {}, "step_ratio": {}}
    for p in passes:
        (o_wall, o_cpu), (b_wall, b_cpu) = ([min(t[i] for t in runs[p.name]) for i in (0, 1)] for runs in (ours, bare))
        out["tokens_per_s"][p.name] = (tokens * p.epochs / o_wall, tokens / b_wall)
        out["ratio"][p.name] = o_wall / (b_wall * p.epochs)
        out["cpu_ratio"][p.name] = o_cpu / (b_cpu * p.epochs)
        spread = ", ".join(f"{o[0] / (b[0] * p.epochs):.2f}" for o, b in zip(ours[p.name], bare[p.name]))
        print(f"tokens_per_s {p.name} ours {tokens * p.epochs / o_wall:.0f} bare {tokens / b_wall:.0f}  "
              f"(bare: {BARE_DESCRIPTION[BARE_MODE[p.mode]]}; wall ratio per repeat {spread})")
        print(f"cpu_ratio {p.name} {out['cpu_ratio'][p.name]:.2f}")
        o_steps, b_steps = steps[p.name]
        o_median, b_median = statistics.median(o_steps), statistics.median(b_steps)
        out["step_ratio"][p.name] = o_median / b_median
        print(f"step_seconds {p.name} ours {o_median:.3f} bare {b_median:.3f}  "
              f"(medians of {len(o_steps)} and {len(b_steps)} steps: ours also runs the method's per-step hooks)")
        print(f"step_ratio {p.name} {out['step_ratio'][p.name]:.2f}  (the steady state: the once-per-pass work and the "
              "slow first steps after it left out)")
        print(f"ratio {p.name} {out['ratio'][p.name]:.2f}")
    print(f"warmup_seconds {warmup_seconds:.1f}  (one tiny fit first: compiles the fused kernels, if any, once per process)")
    out["mask_seconds"] = min(mask_seconds)
    print(f"mask_seconds {out['mask_seconds']:.2f}")
    out["peak"] = min(peaks) / GIB
    out["estimate"] = (estimate.on(device) if estimate is not None else math.nan) / GIB
    if estimate is not None and estimate.host_state and device.type != "cpu":
        print(f"host_state_estimate {estimate.host_state / GIB:.4g}")
    print(f"peak {out['peak']:.4g} estimate {out['estimate']:.4g}")
    return out


if __name__ == "__main__":
    main()
