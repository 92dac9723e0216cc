"""The report and the command of :mod:`speed`: ``dpruner speed --model <folder> [--compare <dense folder>]``
measures both models in one process, prints a markdown table per model (slowdowns as plainly as
speedups) and optionally writes the full result as JSON."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from .speed import BACKENDS, hardware, linear_timings, measure_speed

log = logging.getLogger(__name__)


def _verdict(ratio: Optional[float]) -> str:
    if ratio is None:
        return ""
    word = "slower" if ratio < 0.98 else "faster" if ratio > 1.02 else "same"  # +-2%: timing noise
    return f"{ratio:.2f}x ({word})"


def _mib(n: Optional[float]) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def format_speed_report(result: Mapping[str, Any]) -> str:
    """Markdown: the hardware, then one table per measured model, the comparison with a reference
    model, and the per-linear timings, whichever ``result`` holds (``measure_speed``, ``run_speed``)."""
    runs = result.get("runs") or ([result] if "rows" in result and "protocol" in result else [])
    hw = result.get("hardware") or (runs[0]["hardware"] if runs else {})
    lines = [f"Hardware: {hw.get('cpu')} ({hw.get('cpu_count')} cores, {hw.get('torch_threads')} torch threads), "
             f"load {hw.get('load_average_1min')}, GPU: {hw.get('gpu') or 'none'}; torch {hw.get('torch')}, "
             f"transformers {hw.get('transformers')}; {hw.get('date')}"]
    for run in runs:
        pr, mo = run["protocol"], run["model"]
        lines += ["", f"### {run['label']}: {mo['parameters'] / 1e6:.1f}M parameters, {_mib(mo['weight_bytes'])} MiB weights, "
                  f"{mo['sparsity_of_all_linears']:.1%} zeros over all linears",
                  f"{pr['device']} {pr['dtype']}, batch {pr['batch_size']}, {pr['repeats']} repeats after {pr['warmup']} "
                  f"warmup, seed {pr['seed']}; memory = {pr['memory']}", "",
                  "| backend | phase | tokens | median ms | IQR ms | tokens/s | vs dense | peak mem MiB | weights MiB "
                  "| max abs diff | status |",
                  "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
        for r in run["rows"]:
            ok = r["status"] == "ok"
            diff = r.get("max_abs_diff_vs_dense")
            cells = [f"{r['median_s'] * 1e3:.2f}", f"{r['iqr_s'] * 1e3:.2f}", f"{r['tokens_per_s']:.1f}",
                     _verdict(r.get("speed_vs_dense")), _mib(r["peak_memory_bytes"]), _mib(r["weight_bytes"]),
                     "" if diff is None else f"{diff:.2e}"] if ok else [""] * 7
            lines.append(_md_row([r["backend"], r["phase"], str(r["tokens"]), *cells, r["status"]]))
    if result.get("comparison"):
        lines += ["", "### vs the dense reference model (same run)", "",
                  "| backend | phase | tokens | reference ms | this ms | speed vs reference |", "|---|---|---:|---:|---:|---|"]
        lines += [f"| {c['backend']} | {c['phase']} | {c['tokens']} | {c['reference_median_s'] * 1e3:.2f} | "
                  f"{c['median_s'] * 1e3:.2f} | {_verdict(c['speed_vs_reference'])} |" for c in result["comparison"]]
    if result.get("linear"):
        lin = result["linear"]
        lines += ["", f"### One linear per weight shape ({lin['tokens']} tokens)", "",
                  "| shape (out x in) | count | density | backend | median ms | GFLOP (theory) | GFLOP/s | weight MiB "
                  "| vs dense | status |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---|---|"]
        for r in lin["rows"]:
            cells = [f"{r['median_s'] * 1e3:.3f}", f"{r['flops'] / 1e9:.3f}", f"{r['gflops_per_s']:.1f}",
                     _mib(r["weight_bytes"]), _verdict(r.get("speed_vs_dense"))] if r["status"] == "ok" else [""] * 5
            lines.append(_md_row([f"{r['shape'][0]} x {r['shape'][1]}", str(r["count"]), f"{r['density']:.3f}",
                                  r["backend"], *cells, r["status"]]))
    return "\n".join(lines) + "\n"


def compare_runs(reference: Mapping[str, Any], pruned: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every ``ok`` row of ``pruned`` against the ``dense`` row of ``reference`` with the same phase/tokens."""
    ref = {(r["phase"], r["tokens"]): r["median_s"] for r in reference["rows"] if r["backend"] == "dense" and r["status"] == "ok"}
    return [{"backend": r["backend"], "phase": r["phase"], "tokens": r["tokens"], "median_s": r["median_s"],
             "reference_median_s": ref[(r["phase"], r["tokens"])], "speed_vs_reference": ref[(r["phase"], r["tokens"])] / r["median_s"]}
            for r in pruned["rows"] if r["status"] == "ok" and (r["phase"], r["tokens"]) in ref]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpruner speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF folder / hub id / demo alias / random:<type> (dense or pruned)")
    p.add_argument("--compare", help="dense reference model, measured in the same run (dense backend)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--prefill", nargs="+", type=int, default=[512, 2048], help="prompt lengths of the prefill phase")
    p.add_argument("--decode-context", type=int, default=512, help="KV-cache length of the decode phase")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--linear-tokens", type=int, default=None,
                   help="tokens of the per-linear timings (default: the first prefill length; 0 = skip them)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--config-overrides", type=json.loads, default={}, help="JSON of HF config kwargs (random:* models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-sparsity", type=float, default=0.1, help="sparse backends convert linears with this many zeros")
    p.add_argument("--output", help="write the full result as JSON (atomically)")
    return p


def run_speed(argv: Sequence[str]) -> dict[str, Any]:
    """``dpruner speed``: measure, print the markdown report, optionally write the JSON; returns the result."""
    from .config import ModelSpec
    from .export import atomic_write_json
    from .models import load_causal_lm

    args = build_parser().parse_args(list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    kw = dict(prefill_lengths=args.prefill, decode_context=args.decode_context, batch_size=args.batch_size,
              repeats=args.repeats, warmup=args.warmup, seed=args.seed, min_sparsity=args.min_sparsity)

    def load(name: str) -> nn.Module:
        spec = ModelSpec(name_or_path=name, dtype=args.dtype, config_overrides=dict(args.config_overrides),
                         tokenizer="bytes" if name.startswith("random:") else None)
        return load_causal_lm(spec).to(device)

    model = load(args.model)
    vocab = model.get_input_embeddings().num_embeddings
    out: dict[str, Any] = {"hardware": hardware(), "runs": [], "comparison": [], "linear": None}
    if args.compare:
        reference = load(args.compare)
        vocab = min(vocab, reference.get_input_embeddings().num_embeddings)  # same prompt ids for both models
        out["runs"].append(measure_speed(reference, vocab, backends=["dense"], label=f"reference {args.compare}", **kw))
        del reference
    out["runs"].append(measure_speed(model, vocab, backends=args.backends, label=args.model, **kw))
    if args.compare:
        out["comparison"] = compare_runs(out["runs"][0], out["runs"][1])
    tokens = args.prefill[0] if args.linear_tokens is None else args.linear_tokens
    if tokens > 0:
        out["linear"] = linear_timings(model, tokens=tokens, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                                       backends=[b for b in args.backends if b != "semi_structured_compile"])
    report = format_speed_report(out)
    print(report)  # the command's output: the user asked for this table
    if args.output:
        atomic_write_json(args.output, out)
        log.info("wrote %s", args.output)
    return out
