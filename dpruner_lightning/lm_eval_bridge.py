"""lm-eval-harness tasks on a model already in memory (the optional extra ``[eval]``: ``lm-eval``).

:func:`evaluate_lm_eval` wraps the model and its tokenizer in lm-eval's ``HFLM`` (``pretrained=<the
model object>``, so a pruned model is scored exactly as it is in memory: no re-export, no reload) and runs
``lm_eval.simple_evaluate`` on task names of lm-eval's registry or of task YAML files under
``include_paths`` (e.g. a multiple-choice task over a local ``json`` file, which runs offline).

Metric names are lm-eval's own (``acc``, ``acc_norm``, ``acc_stderr`` ...): its ``acc_norm`` divides
the log-likelihood by the choice's CHARACTER count, which :mod:`evaluation` calls ``accuracy_per_char``;
``acc`` is :mod:`evaluation`'s ``accuracy``. A metric computed under a filter other than lm-eval's
default ``none`` keeps it as ``metric/filter`` (``exact_match/strict-match``).

``lm_eval`` is imported only when a function here runs; without it they raise :class:`MissingExtraError`
naming the extra. lm-eval seeds Python, NumPy and torch itself (``seed``) before it samples few-shot
examples.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .extras import MissingExtraError, require  # noqa: F401 - MissingExtraError: part of this module's API

log = logging.getLogger(__name__)

#: Prefix of an lm-eval task name in ``dpruner eval --tasks``.
PREFIX = "lm_eval:"


def require_lm_eval():
    """The ``lm_eval`` module, or :class:`MissingExtraError` saying which extra installs it."""
    return require("eval", "lm-eval-harness tasks (lm-eval >= 0.4.8)", "lm_eval")


def lm_eval_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # not installed, or installed without metadata
        return None


def task_manager(include_paths: Sequence[str | Path] = (), include_defaults: bool = True):
    """lm-eval's ``TaskManager`` over its own tasks (``include_defaults``) and the task YAML files under
    ``include_paths`` (checked to exist first). Indexing lm-eval's ~15k task files takes seconds."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [Path(p) for p in include_paths]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"lm-eval include path {p} does not exist: pass a folder (or file) of task YAML configs")
    return TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=include_defaults)


def check_task_names(names: Sequence[str], manager) -> None:
    """Refuse names lm-eval does not know (before any model is loaded), suggesting close ones."""
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise ValueError(f"unknown lm-eval task {'; '.join(hints)}. `lm-eval ls tasks` lists lm-eval's tasks; a task of your "
                     "own is a YAML config in a folder passed as --lm-eval-include")


def _metrics(entry: dict) -> dict[str, Any]:
    """``{"acc,none": .., "acc_stderr,none": ..}`` -> ``{"acc": .., "acc_stderr": ..}``; "N/A" -> None."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if "," not in key:
            continue  # alias, name, sample_len
        metric, flt = key.split(",", 1)
        out[metric if flt == "none" else f"{metric}/{flt}"] = None if value == "N/A" else value
    return out


def _samples(samples: Sequence[dict]) -> list[dict]:
    """Per document: its index, target and the log-likelihood of each choice (multiple choice)."""
    out = []
    for s in samples:
        resps = s.get("filtered_resps") or []
        lls = [float(r[0]) if isinstance(r, (list, tuple)) else r for r in resps]
        out.append({"doc_id": s.get("doc_id"), "target": s.get("target"), "loglikelihoods": lls})
    return out


def evaluate_lm_eval(model, tokenizer, tasks: Sequence[str], *, include_paths: Sequence[str | Path] = (),
                     manager=None, limit: Optional[int] = None, num_fewshot: Optional[int] = None, batch_size: int = 1,
                     max_length: Optional[int] = None, bootstrap_iters: int = 1000, seed: int = 0,
                     return_samples: bool = False) -> dict[str, dict]:
    """Run lm-eval tasks on ``model`` (any ``transformers`` causal LM, on its device) and ``tokenizer``.

    Returns ``{task: {"task", "source": "lm_eval", "n", <lm-eval's metrics>, "score", "score_stderr",
    "score_metric"}}`` for every task and group lm-eval reports (``score`` is the entry's first metric, as
    lm-eval's own table lists it); with ``return_samples``, ``samples`` lists per document its target and the
    log-likelihood of each choice. ``limit``: the first N documents of each task (lm-eval's ``limit``).
    """
    if not tasks:
        raise ValueError("no lm-eval task given")
    for key, value in (("limit", limit), ("batch_size", batch_size), ("max_length", max_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key} must be a positive integer; got {value!r}")
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(include_paths)
    check_task_names(tasks, manager)
    was_training = model.training
    model.eval()
    try:
        hf_log = logging.getLogger("lm_eval.models.huggingface")
        level = hf_log.level
        hf_log.setLevel(logging.ERROR)  # its two warnings about an in-memory model: passing one is the point here
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        finally:
            hf_log.setLevel(level)
        raw = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                      log_samples=return_samples, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    if raw is None:  # lm-eval returns None on ranks other than 0; we run one process
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    out: dict[str, dict] = {}
    for name, entry in raw["results"].items():
        metrics = _metrics(entry)
        first = next((k for k, v in metrics.items() if "stderr" not in k and isinstance(v, (int, float))), None)
        n = (raw.get("n-samples") or {}).get(name, {}).get("effective")
        out[name] = {"task": name, "source": "lm_eval", "n": n, **metrics, "score": metrics.get(first) if first else None,
                     "score_stderr": metrics.get(f"{first}_stderr") if first else None, "score_metric": first}
        if return_samples and name in (raw.get("samples") or {}):
            out[name]["samples"] = _samples(raw["samples"][name])
    return out
