"""Where is the speedup? The demo model dense vs 50% unstructured vs 2:4, same prompts, same run.

Loads SmolLM2-135M (the demo model, cached by ``dpruner_lightning.assets``; a random Llama of the same
shape when it cannot be had), then in one process measures:

* ``dense``: the original model (the reference);
* ``50% row``: every decoder linear magnitude-pruned in memory, the smallest 50% of each row zeroed;
* ``2:4``: the smallest 2 of every 4 consecutive inputs zeroed (what the GPU semi-structured kernels take),

each with every backend that exists here (``dense``, ``csr``; on CUDA ``semi_structured`` eager and
compiled), plus one linear per weight shape, and prints speed ratios vs the dense reference.

    python benchmarks/speed.py                                   # CPU defaults: ~2 minutes on 2 cores
    python benchmarks/speed.py --prefill 512 2048 --decode-context 512 --repeats 10 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import torch
from torch import nn

from dpruner_lightning.algorithms.masks import apply_mask_, select_mask
from dpruner_lightning.algorithms.targets import find_targets
from dpruner_lightning.config import ModelSpec
from dpruner_lightning.export import atomic_write_json, atomic_write_text
from dpruner_lightning.models import load_causal_lm
from dpruner_lightning.speed import BACKENDS, linear_timings, measure_speed
from dpruner_lightning.speed_report import compare_runs, format_speed_report

log = logging.getLogger("benchmarks.speed")

#: SmolLM2-135M's shape, for a random stand-in when the demo model cannot be fetched.
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)


def load_demo(dtype: str) -> tuple[nn.Module, str]:
    """The demo model, else (offline, no cache) a random model of the same shape, said so in its name."""
    try:
        return load_causal_lm(ModelSpec(name_or_path="smollm2-135m", dtype=dtype)), "SmolLM2-135M-Instruct (demo)"
    except Exception as err:  # no PyPI and no cache: the timings of a same-shape random model still hold
        log.warning("demo model unavailable (%s); using a random Llama of the same shape", err)
        spec = ModelSpec(name_or_path="random:llama", dtype=dtype, config_overrides=SMOLLM2_SHAPE)
        return load_causal_lm(spec), "random Llama with SmolLM2-135M's shape"


@torch.no_grad()
def prune_(model: nn.Module, granularity: str) -> None:
    """Magnitude pruning in memory: 50% per row (``row``) or 2 of every 4 inputs (``2:4``)."""
    for target in find_targets(model).values():
        w = target.weight_view()
        apply_mask_(w, select_mask(w.abs(), 0.5, granularity))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prefill", nargs="+", type=int, default=[128, 512])
    p.add_argument("--decode-context", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default="benchmarks/results/speed_cpu.md", help="markdown; the JSON goes beside it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    start = time.perf_counter()
    model, name = load_demo(args.dtype)
    model.to(device)
    kw = dict(prefill_lengths=args.prefill, decode_context=args.decode_context, repeats=args.repeats,
              warmup=args.warmup)
    original = {n: t.weight.detach().clone() for n, t in find_targets(model).items()}  # restored between variants
    out: dict[str, Any] = {"runs": [], "comparison": {}, "linear": {}}
    out["runs"].append(measure_speed(model, backends=["dense"], label="dense (reference)", **kw))
    for label, granularity in (("50% row", "row"), ("2:4", "2:4")):
        prune_(model, granularity)
        run = measure_speed(model, backends=BACKENDS, label=f"{label} magnitude-pruned", **kw)
        out["runs"].append(run)
        out["comparison"][label] = compare_runs(out["runs"][0], run)
        out["linear"][label] = linear_timings(model, tokens=args.prefill[0], repeats=args.repeats, warmup=args.warmup,
                                              backends=[b for b in BACKENDS if b != "semi_structured_compile"])
        with torch.no_grad():
            for n, t in find_targets(model).items():
                t.weight.copy_(original[n])
    out["hardware"] = out["runs"][0]["hardware"]
    out["seconds"] = time.perf_counter() - start
    parts = [format_speed_report({"hardware": out["hardware"], "runs": out["runs"]})]
    for label in out["comparison"]:
        parts.append(format_speed_report({"hardware": out["hardware"], "comparison": out["comparison"][label],
                                          "linear": out["linear"][label]}).split("\n", 1)[1].replace(
            "### vs the dense reference model", f"### {label} vs the dense reference model").replace(
            "### One linear per weight shape", f"### {label}: one linear per weight shape"))
    protocol = (f"# Speed of pruned models: {name}\n\n"
                f"Protocol: `python benchmarks/speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`; "
                f"{device} {args.dtype}, {torch.get_num_threads()} torch threads, batch 1, prefill {args.prefill} tokens "
                f"(one forward, last-position logits), decode = 1 token on a {args.decode_context}-token KV cache, "
                f"{args.repeats} timed repeats after {args.warmup} warmup, median and IQR; same seeded prompts "
                f"for every model and backend, one process; {out['seconds']:.0f} s in all; date {out['hardware']['date']}.\n"
                "Speed ratio = reference median / this median: below 1.00x means slower.\n\n")
    report = protocol + "\n".join(parts)
    atomic_write_text(args.output, report)
    atomic_write_json(args.output.rsplit(".", 1)[0] + ".json", out)
    print(report)  # the benchmark's product: the table
    return out


if __name__ == "__main__":
    main()
