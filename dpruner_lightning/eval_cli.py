"""``dpruner eval --model <folder> --tasks <names...>``: task scores of a dense or pruned model.

The model: a Hugging Face folder (dense, or our ``pruned_model/`` export), our sparse checkpoint
folder (``sparse_model/``, :func:`~dpruner_lightning.export.load_sparse_model`), a structurally
pruned folder (:func:`~dpruner_lightning.algorithms.structured.load_structured_pruned`), a 2:4
``compressed_24_model/`` (:func:`~dpruner_lightning.deploy.load_compressed_24`), a run folder holding one
of those exports (``pruned_model/`` first), a demo alias, a hub id or ``random:<type>``.

Tasks (any mix, one process, one model load):

* ours (:mod:`tasks` presets): ``pubmed_title`` (built-in records), ``pubmedqa=<file>``,
  ``casehold=<file>``, ``billsum=<file>``; or ``--task-file`` with a YAML list of ``compare.tasks``
  entries (options such as ``calibrate``, ``normalize``, ``limit``);
* lm-eval-harness's (the optional extra ``[eval]``): ``lm_eval:<task>`` (``lm_eval:hellaswag``), and
  tasks of your own as YAML configs in a folder given to ``--lm-eval-include``.

It prints a markdown table (one line per task and metric) and, with ``--output``, writes everything as
JSON (atomically). Every input is checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from .lm_eval_bridge import PREFIX
from .model_folders import check_model, load_model, resolve_model_folder  # noqa: F401 - resolve_model_folder: API

log = logging.getLogger(__name__)



# -- the tasks -----------------------------------------------------------------------------------------
def _task_entries(names: Sequence[str], task_file: Optional[str]) -> tuple[list[dict], list[str]]:
    """``(our task entries, lm-eval task names)`` from ``--tasks`` and ``--task-file``, checked."""
    from .tasks import PRESETS

    ours, theirs = [], []
    for name in names:
        if name.startswith(PREFIX):
            if not name[len(PREFIX):]:
                raise ValueError(f"{name!r}: name the lm-eval task after the prefix, e.g. {PREFIX}hellaswag")
            theirs.append(name[len(PREFIX):])
            continue
        preset, sep, path = name.partition("=")
        if preset not in PRESETS:
            raise ValueError(f"unknown task {name!r}. Our tasks: {', '.join(sorted(PRESETS))} (pubmedqa, casehold and "
                             f"billsum as <name>=<records file>); lm-eval tasks: {PREFIX}<task> (e.g. {PREFIX}hellaswag, "
                             "needs the [eval] extra); more options: --task-file <tasks.yaml>")
        if PRESETS[preset][2] and not path:
            raise ValueError(f"task {preset!r} needs its records: --tasks {preset}=<file.jsonl> (or an entry with "
                             "path: / dataset: in --task-file)")
        ours.append({"name": preset, **({"path": path} if sep else {})})
    if task_file:
        import yaml

        file = Path(task_file)
        if not file.is_file():
            raise FileNotFoundError(f"--task-file {task_file} does not exist")
        loaded = yaml.safe_load(file.read_text())
        entries = loaded.get("tasks") if isinstance(loaded, dict) else loaded
        if not isinstance(entries, list):
            raise ValueError(f"--task-file {task_file}: expected a list of task entries (or tasks: [...]), e.g. "
                             "[{name: pubmedqa, path: data/pubmedqa.jsonl, limit: 100}]")
        ours += entries
    if len(set(theirs)) != len(theirs):
        raise ValueError(f"lm-eval tasks given twice: {sorted({t for t in theirs if theirs.count(t) > 1})}")
    return ours, theirs


def _with_defaults(entry: Any, limit: Optional[int], max_length: Optional[int]) -> Any:
    """``--limit`` / ``--max-length`` where an entry does not set its own. A pubmed_title entry takes
    ``--limit`` as its number of questions (``n``): its wrong titles still come from every record."""
    if not isinstance(entry, dict):
        return entry  # parse_task_specs names the problem
    out = dict(entry)
    if max_length is not None:
        out.setdefault("max_length", max_length)
    title = out.get("preset", out.get("name")) == "pubmed_title"
    if limit is not None and "limit" not in out and not (title and "n" in out):
        out["n" if title else "limit"] = limit
    return out


# -- the report ----------------------------------------------------------------------------------------
_SHOWN = ("accuracy", "accuracy_per_token", "accuracy_per_char", "accuracy_calibrated", "rouge1", "rouge2", "rougeL")


def _metric_rows(name: str, m: dict) -> list[list[str]]:
    """Table lines of one task: every metric with its interval (ours) or standard error (lm-eval)."""
    n = "" if m.get("n") is None else str(m["n"])
    rows = []
    if m.get("source") == "lm_eval":
        keys = [k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k
                and k not in ("n", "score", "score_stderr")]
        for k in keys:
            err = m.get(f"{k}_stderr")
            rows.append([k, f"{m[k]:.4f}", "" if err is None else f"± {err:.4f} (stderr)"])
    else:
        for k in (k for k in _SHOWN if k in m):
            ci = m.get(f"{k}_ci")
            rows.append([k, f"{m[k]:.4f}", f"[{ci[0]:.3f}, {ci[1]:.3f}] (bootstrap 95%)" if ci else ""])
    return [[name, m.get("source", "dpruner"), n, (k + " *" if k == m.get("score_metric") else k), v, e] for k, v, e in rows]


def format_eval_table(result: dict) -> str:
    """Markdown: one line per task and metric; ``*`` marks each task's headline score."""
    lines = [f"Model: {result['model']} ({result['loaded']['kind']}, {result['dtype']}, {result['device']})", "",
             "| task | from | n | metric | value | interval |", "|---|---|---:|---|---:|---|"]
    for name, metrics in result["tasks"].items():
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in _metric_rows(name, metrics)]
    lines += ["", "* = the task's headline score. accuracy_per_token / accuracy_per_char: log-likelihood divided by the "
              "choice's tokens / characters (accuracy_per_char = lm-eval's acc_norm; accuracy = acc)."]
    return "\n".join(lines) + "\n"


EPILOG = f"""task names (--tasks, any mix):
  ours:     pubmed_title (built-in records; --limit = questions), pubmedqa=<file>, casehold=<file>,
            billsum=<file>; --task-file takes compare.tasks entries (calibrate, normalize: token|char|none ...)
  lm-eval:  {PREFIX}<task>, e.g. {PREFIX}hellaswag (needs the extra: pip install 'dpruner-lightning[eval]');
            your own lm-eval task YAML files: --lm-eval-include <folder> --tasks {PREFIX}<its task name>
metrics: accuracy (lm-eval acc), accuracy_per_token, accuracy_per_char (= lm-eval acc_norm), accuracy_calibrated
example: dpruner eval --model runs/d_pruner/version_0 --tasks pubmed_title {PREFIX}hellaswag --limit 200 --output eval.json"""


# -- the command ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpruner eval", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Task scores of a dense or pruned model: our tasks and lm-eval-harness tasks, "
                                            "one model load.", epilog=EPILOG)
    p.add_argument("--model", required=True, help="model folder (dense, pruned_model/, sparse_model/, structured), run "
                   "folder, demo alias, hub id or random:<type>")
    p.add_argument("--tasks", nargs="+", default=[], metavar="TASK",
                   help=f"our tasks (pubmed_title, <preset>=<records file>) and/or {PREFIX}<task>")
    p.add_argument("--task-file", help="YAML list of our task entries, as compare.tasks (name, preset, path, limit, options)")
    p.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                   help="folder (or file) of lm-eval task YAML configs; repeatable")
    p.add_argument("--limit", type=int, help="items per task (ours: a seeded subset; lm-eval: the first N)")
    p.add_argument("--max-length", type=int, help="tokens per scored sequence (ours: default 512; lm-eval: the model's)")
    p.add_argument("--num-fewshot", type=int, help="lm-eval few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (ours score one item at a time)")
    p.add_argument("--tokenizer", help="tokenizer folder / hub id / bytes (default: the model folder's own)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--config-overrides", type=json.loads, default={}, help="JSON of HF config kwargs (random:* models)")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's seeds (ours are fixed: seeded subsets and bootstrap)")
    p.add_argument("--output", help="write the full result as JSON (atomically)")
    return p


def _versions() -> dict[str, Optional[str]]:
    import transformers

    from . import __version__
    from .lm_eval_bridge import lm_eval_version

    return {"dpruner_lightning": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": lm_eval_version()}


def run_eval(argv: Sequence[str]) -> dict[str, Any]:
    """``dpruner eval``: check the inputs, load the model, score every task, print the table, optionally
    write the JSON; returns the result."""
    from .export import atomic_write_json
    from .tasks import build_task, evaluate_task, parse_task_specs

    args = build_parser().parse_args(list(argv))
    if not args.tasks and not args.task_file:
        raise ValueError("no task given: --tasks pubmed_title and/or --tasks lm_eval:<task> (or --task-file)")
    for key, least in (("limit", 1), ("max_length", 1), ("batch_size", 1), ("num_fewshot", 0)):
        value = getattr(args, key)
        if value is not None and value < least:
            raise ValueError(f"--{key.replace('_', '-')} must be >= {least}; got {value}")
    if args.output and Path(args.output).is_dir():
        raise IsADirectoryError(f"--output {args.output} is a folder: name the JSON file to write, e.g. {args.output}/eval.json")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here; use --device cpu (or auto)")
    entries, lm_tasks = _task_entries(args.tasks, args.task_file)
    check_model(args.model, args.tokenizer)
    entries = [_with_defaults(e, args.limit, args.max_length) for e in entries]
    specs = parse_task_specs(entries, "dpruner eval tasks")
    manager = None
    if lm_tasks or args.lm_eval_include:
        from .lm_eval_bridge import check_task_names, task_manager

        manager = task_manager(args.lm_eval_include)  # raises MissingExtraError without the [eval] extra
        check_task_names(lm_tasks, manager)
    tasks = [(spec, build_task(spec)) for spec in specs]  # records are read (and checked) before the model
    if any(spec.preset == "pubmed_title" for spec in specs):
        log.warning("pubmed_title: dpruner eval does not know which documents the model was calibrated on, so its "
                    "questions may include them (dpruner compare leaves them out)")
    model, tokenizer, loaded = load_model(args.model, args.dtype, args.tokenizer, args.config_overrides)
    model.to(device)
    result: dict[str, Any] = {"model": args.model, "loaded": loaded, "dtype": args.dtype, "device": str(device),
                              "tasks": {}, "seconds": {}, "versions": _versions(),
                              "settings": {k: getattr(args, k) for k in ("limit", "max_length", "num_fewshot", "batch_size", "seed",
                                                                         "lm_eval_include", "tokenizer")}}
    for spec, task in tasks:
        t0 = time.perf_counter()
        result["tasks"][spec.name] = {**evaluate_task(model, tokenizer, task, max_length=spec.max_length), "source": "dpruner"}
        result["seconds"][spec.name] = round(time.perf_counter() - t0, 3)
    if lm_tasks:
        from .lm_eval_bridge import evaluate_lm_eval

        t0 = time.perf_counter()
        scores = evaluate_lm_eval(model, tokenizer, lm_tasks, manager=manager, limit=args.limit, num_fewshot=args.num_fewshot,
                                  batch_size=args.batch_size, max_length=args.max_length, seed=args.seed)
        result["tasks"].update({PREFIX + name: metrics for name, metrics in scores.items()})
        result["seconds"]["lm_eval"] = round(time.perf_counter() - t0, 3)
    print(format_eval_table(result))  # the command's output: the user asked for this table
    if args.output:
        atomic_write_json(args.output, result)
        log.info("wrote %s", args.output)
    return result
