"""The report and the command of :mod:`speed`: ``dpruner speed --model <folder> [<folder> ...] [--compare <dense
folder>]`` measures every model in one process on the same prompts (e.g. a structured and a 2:4 model
against their dense original: the ratios hold even when other work shares the machine), prints a
markdown table per model (slowdowns as plainly as speedups) and optionally writes the full result as JSON."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from .speed import BACKENDS, hardware, linear_timings, measure_speed, phase_step, seeded_prompts

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
        cmp = result["comparison"]
        several = len({(c["backend"], c["phase"], c["tokens"]) for c in cmp}) < len(cmp)  # a model column says which
        lines += ["", "### vs the dense reference model (same run)", "",
                  "| " + "model | " * several + "backend | phase | tokens | reference ms | this ms | speed vs reference |",
                  "|" + "---|" * several + "---|---|---:|---:|---:|---|"]
        lines += [_md_row([c.get("model", "")] * several + [
            c["backend"], c["phase"], str(c["tokens"]), f"{c['reference_median_s'] * 1e3:.2f}", f"{c['median_s'] * 1e3:.2f}",
            _verdict(c["speed_vs_reference"])]) for c in cmp]
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
    return [{"model": pruned.get("label"), "backend": r["backend"], "phase": r["phase"], "tokens": r["tokens"], "median_s": r["median_s"],
             "reference_median_s": ref[(r["phase"], r["tokens"])], "speed_vs_reference": ref[(r["phase"], r["tokens"])] / r["median_s"]}
            for r in pruned["rows"] if r["status"] == "ok" and (r["phase"], r["tokens"]) in ref]


@torch.inference_mode()
def interleaved_speed(models: Mapping[str, nn.Module], vocab: int, *, prefill_lengths: Sequence[int], decode_context: int,
                      batch_size: int = 1, repeats: int = 5, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
    """The dense forward of every model, timed in turn: repeat r of each model runs back to back with
    the others (the order rotating every repeat), on the same seeded prompts. Each model's speed vs the
    first one (the reference) is the median over repeats of ``reference[r] / this[r]``: two timings
    taken seconds apart, so the ratio holds while other work shares the machine (a model measured
    minutes after its reference does not). All models are in memory at once."""
    labels = list(models)
    device = next(models[labels[0]].parameters()).device
    prompts = seeded_prompts(vocab, [*prefill_lengths, decode_context + 1], batch_size, seed, device)
    rows: list[dict[str, Any]] = []
    for phase, n in [("prefill", int(n)) for n in prefill_lengths] + [("decode", decode_context)]:
        steps = {label: phase_step(model, model, phase, n, prompts) for label, model in models.items()}
        times: dict[str, list[float]] = {label: [] for label in labels}
        for label in labels:
            for _ in range(warmup):
                steps[label][1]()
                steps[label][0]()
        for r in range(repeats):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                step, reset, _ = steps[label]
                reset()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[label].append(time.perf_counter() - t0)
        for label in labels:
            ratios = [a / b for a, b in zip(times[labels[0]], times[label])]
            q = statistics.quantiles(times[label], n=4, method="inclusive") if repeats > 1 else [times[label][0]] * 3
            rows.append({"model": label, "phase": phase, "tokens": n, "median_s": statistics.median(times[label]),
                         "iqr_s": q[2] - q[0], "speed_vs_reference": statistics.median(ratios),
                         "ratio_min": min(ratios), "ratio_max": max(ratios)})
        del steps  # the KV caches
    return {"hardware": hardware(), "reference": labels[0], "rows": rows,
            "protocol": {"prefill_lengths": list(prefill_lengths), "decode_context": decode_context, "batch_size": batch_size,
                         "repeats": repeats, "warmup": warmup, "seed": seed, "device": str(device),
                         "order": "interleaved: every repeat runs each model in turn, order rotating"}}


def format_interleaved(result: Mapping[str, Any]) -> str:
    """Markdown of :func:`interleaved_speed`."""
    hw, pr = result["hardware"], result["protocol"]
    lines = [f"Hardware: {hw.get('cpu')} ({hw.get('cpu_count')} cores, {hw.get('torch_threads')} torch threads), "
             f"load {hw.get('load_average_1min')}, GPU: {hw.get('gpu') or 'none'}; torch {hw.get('torch')}; {hw.get('date')}",
             "", f"### Dense forward, models interleaved ({pr['repeats']} repeats after {pr['warmup']} warmup, batch "
             f"{pr['batch_size']}); reference: {result['reference']}", "",
             "| model | phase | tokens | median ms | IQR ms | speed vs reference (median of per-repeat ratios) | min - max |",
             "|---|---|---:|---:|---:|---|---|"]
    lines += [_md_row([r["model"], r["phase"], str(r["tokens"]), f"{r['median_s'] * 1e3:.2f}", f"{r['iqr_s'] * 1e3:.2f}",
                       _verdict(r["speed_vs_reference"]), f"{r['ratio_min']:.2f} - {r['ratio_max']:.2f}"])
              for r in result["rows"]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpruner speed", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, nargs="+",
                   help="HF folder / hub id / demo alias / random:<type> (dense or pruned); several are measured in turn")
    p.add_argument("--compare", help="dense reference model, measured first in the same run (dense backend)")
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
    p.add_argument("--interleave", action="store_true",
                   help="dense backend only: load --compare and every --model at once and time them in turn, repeat by "
                        "repeat, so their ratios hold on a machine shared with other work")
    p.add_argument("--output", help="write the full result as JSON (atomically)")
    return p


def run_speed(argv: Sequence[str]) -> dict[str, Any]:
    """``dpruner speed``: measure, print the markdown report, optionally write the JSON; returns the result."""
    from .config import ModelSpec
    from .export import atomic_write_json
    from .model_folders import check_model, load_model
    from .models import load_config

    args = build_parser().parse_args(list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    kw = dict(prefill_lengths=args.prefill, decode_context=args.decode_context, batch_size=args.batch_size,
              repeats=args.repeats, warmup=args.warmup, seed=args.seed, min_sparsity=args.min_sparsity)

    def load(name: str) -> nn.Module:
        """Any folder kind (a run folder, sparse_model/, structured ...); the prompts are seeded ids: no tokenizer."""
        return load_model(name, args.dtype, tokenizer="bytes", config_overrides=args.config_overrides)[0].to(device)

    def config_of(name: str):
        located = check_model(name, tokenizer="bytes")  # bad input fails here, before any model is loaded
        path = str(located[0]) if located else name
        return load_config(ModelSpec(name_or_path=path, config_overrides=dict(args.config_overrides)))

    names = ([args.compare] if args.compare else []) + list(args.model)
    # the same prompt ids for every model: drawn below the smallest vocabulary (configs only, no weights)
    sizes = [getattr(config_of(n), "vocab_size", None) for n in names]  # None: a GGUF config decides at load
    vocab = min((int(v) for v in sizes if v), default=None)
    if args.interleave:
        if args.backends != ["dense"]:
            raise ValueError("--interleave times the dense forward only: add --backends dense")
        models: dict[str, nn.Module] = {}
        for i, name in enumerate(names):
            label = f"reference {name}" if i == 0 and args.compare else name
            label = f"{label} ({i + 1})" if label in models else label  # the same model twice: a drift check
            models[label] = load(name)
        result = interleaved_speed(models, vocab, prefill_lengths=args.prefill, decode_context=args.decode_context,
                                   batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
        print(format_interleaved(result))  # the command's output
        if args.output:
            atomic_write_json(args.output, result)
        return result
    out: dict[str, Any] = {"hardware": hardware(), "runs": [], "comparison": [], "linear": None}
    if args.compare:
        reference = load(args.compare)
        out["runs"].append(measure_speed(reference, vocab, backends=["dense"], label=f"reference {args.compare}", **kw))
        del reference
    tokens = args.prefill[0] if args.linear_tokens is None else args.linear_tokens
    for i, name in enumerate(args.model):  # one model in memory at a time
        model = load(name)
        out["runs"].append(measure_speed(model, vocab, backends=args.backends, label=name, **kw))
        if args.compare:
            out["comparison"] += compare_runs(out["runs"][0], out["runs"][-1])
        if tokens > 0 and i == 0:  # per-linear timings of the first model
            out["linear"] = linear_timings(model, tokens=tokens, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                                           backends=[b for b in args.backends if b != "semi_structured_compile"])
        del model
    report = format_speed_report(out)
    print(report)  # the command's output: the user asked for this table
    if args.output:
        atomic_write_json(args.output, out)
        log.info("wrote %s", args.output)
    return out
