"""Why the first steps of a pass are slow on some machines: a bare loop, with D-PRUNER's dual-pass state
allocated between two of its steps.

Runs the bare forward+backward+SGD loop of ``scale.py`` on a shape with random weights; after
``--before`` steps it allocates what the dual pass keeps per target (W0 in the model's dtype, S and the
fp32 masters), as ``scale.py``'s run does at the start of the pass (one tensor per matrix), and goes on
for ``--after`` steps. Prints every step's seconds and minor page faults, then::

    slowdown <mean of the first 3 steps after the allocation / median step before it>
    steady <median of the remaining steps after / median step before>

On this project's 2-core VM (llama-100m, bf16, 0.79 GiB of state): slowdown 1.42, 1.13 and 1.72 in three runs,
steady 1.00-1.05; every step page-faults 64K-160K times (most likely glibc mapping its largest blocks,
the logits, afresh and returning them to the OS each step). With glibc keeping freed memory
(``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000``) the steps after the first fault almost
never, run 10% faster, and the slowdown is 1.07. A pass of 16 steps pays this once (the state is
allocated at its start); a run of a hundred steps hardly notices it. Our reading (not measured here):
memory the process takes afresh is slow to touch at first on a VM whose host backs guest memory lazily.

    python benchmarks/allocation_warmup.py                     # llama-100m, bf16, CPU: about 30 s
"""

from __future__ import annotations

import argparse
import resource
import statistics
from typing import Optional

import torch
from calibration_timing import bare_loop_times
from scale import SHAPES

from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.config import ModelSpec
from dpruner_lightning.models import load_causal_lm


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-100m")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--before", type=int, default=8, help="steps before the allocation (the first two warm up)")
    ap.add_argument("--after", type=int, default=10, help="steps after it (at least 4)")
    args = ap.parse_args(argv)
    if args.before < 3 or args.after < 4:
        ap.error("--before must be at least 3 and --after at least 4")
    torch.manual_seed(0)
    spec = ModelSpec(name_or_path="random:llama", tokenizer="bytes", config_overrides=dict(SHAPES[args.shape]),
                     dtype=args.dtype)
    model = load_causal_lm(spec)
    params = [t.weight for t in find_targets(model).values()]
    batches = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.before + args.after, args.batch_size, args.seq_len))
    seconds, state = [], []
    for i, batch in enumerate(batches):
        if i == args.before:
            with torch.no_grad():  # the dual pass's start: W0, S, fp32 masters, one tensor per matrix
                state = [p.detach().clone() for p in params] + [torch.zeros_like(p, dtype=torch.float32) for p in params]
                if args.dtype != "float32":
                    state += [p.detach().float() for p in params]
            print(f"allocated {sum(t.numel() * t.element_size() for t in state) / 2**30:.2f} GiB of state")
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        # scale.py's bare loop, one micro-batch at a time (its SGD has no state, so a new one per step is the same)
        seconds.append(bare_loop_times(spec, batch, args.batch_size, "fbs", 3e-4, model=model)[0])
        print(f"step {i} {seconds[-1]:.3f} s, {resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults} minor faults")
    before = statistics.median(seconds[2: args.before])
    out = {"slowdown": statistics.mean(seconds[args.before: args.before + 3]) / before,
           "steady": statistics.median(seconds[args.before + 3:]) / before}
    print(f"slowdown {out['slowdown']:.2f}\nsteady {out['steady']:.2f}")
    return out


if __name__ == "__main__":
    main()
