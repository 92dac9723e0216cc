"""Domain task accuracy by multiple-choice log-likelihood (the lm-eval-harness way, our own code).

For each record, the prompt (a format template over the record) is the context and each choice a
continuation. A choice's score is the sum of the log-probabilities of its tokens given the context;
the context and the continuation are tokenised SEPARATELY and the ids concatenated, so the scored tokens
are exactly the choice's tokens. Ways of picking the answer (each gives an accuracy):

* ``accuracy``: the highest raw score (lm-eval-harness's ``acc``);
* ``accuracy_per_token``: the highest score divided by the choice's number of TOKENS (tokenizer
  dependent; called ``accuracy_norm`` before, renamed because it is not lm-eval's ``acc_norm``);
* ``accuracy_per_char``: the highest score divided by the choice's number of CHARACTERS, the choice
  text without the leading ``delimiter`` (lm-eval-harness's ``acc_norm``: its continuation is
  ``target_delimiter + choice`` and it divides by ``len(choice)``);
* ``accuracy_calibrated`` (``task.calibrate``): the highest raw score minus the choice's score after a
  neutral prompt (which removes a model's prior for some answer words).

Results saved under the old names load through :func:`upgrade_metrics` (renamed, with a deprecation log line).

Speed: the context runs ONCE and its key/value cache is repeated for the choices, which then run as
one right-padded batch of continuation tokens only (:func:`score_choices`). A model whose cache API
does not fit (or gives other numbers on the first record it scores) falls back to one full padded
forward of context + choice per choice, automatically.

Metrics also include the macro-F1 over the answer classes (choice positions) and a bootstrap 95%
interval of each accuracy (:func:`bootstrap_ci`).

    task = pubmedqa(records)                  # or MultipleChoiceTask(name, records, prompt, choices, label)
    evaluate_multiple_choice(model, tokenizer, task)   # {"accuracy", "accuracy_per_token", "macro_f1", ...}
"""

from __future__ import annotations

import inspect
import logging
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .sources import TextSource, load_records

log = logging.getLogger(__name__)


def _format(template: str, record: dict, task: str, what: str) -> str:
    try:
        return template.format(**record)
    except KeyError as err:
        raise ValueError(f"task {task!r}: {what} template field {err} not in the record; fields: {sorted(record)}") from err


#: ``normalize`` value -> the accuracy the headline ``score`` reports.
HEADLINES = {"token": "accuracy_per_token", "char": "accuracy_per_char", "none": "accuracy"}


def normalization(value: Union[str, bool], where: str = "normalize") -> str:
    """``"token"``, ``"char"`` or ``"none"`` from a ``normalize`` setting (booleans of older configs:
    True = per token, what ``accuracy_norm`` computed; False = none)."""
    if value is True or value is False:
        return "token" if value else "none"
    if value not in HEADLINES:
        raise ValueError(f"{where}: normalize must be one of {sorted(HEADLINES)} (or true = token, false = none); "
                         f"got {value!r}")
    return value


#: Metric keys of earlier versions -> their current names (same computation).
RENAMED_METRICS = {"accuracy_norm": "accuracy_per_token", "accuracy_norm_ci": "accuracy_per_token_ci",
                   "macro_f1_norm": "macro_f1_per_token"}
_WARNED_RENAMES: set[str] = set()


def upgrade_metrics(metrics: dict, where: str = "saved results") -> dict:
    """A copy of one task's saved metrics with the keys (and ``score_metric``) of earlier versions renamed:
    ``accuracy_norm`` was the per-TOKEN accuracy, now ``accuracy_per_token``; nothing is recomputed.
    Logs a deprecation line once per ``where``."""
    out = {RENAMED_METRICS.get(k, k): v for k, v in metrics.items()}
    if isinstance(out.get("score_metric"), str):
        out["score_metric"] = RENAMED_METRICS.get(out["score_metric"], out["score_metric"])
    if out != metrics and where not in _WARNED_RENAMES:
        _WARNED_RENAMES.add(where)
        log.warning("%s: deprecated metric name 'accuracy_norm' (the per-token accuracy, not lm-eval's per-character "
                    "acc_norm) read as 'accuracy_per_token'", where)
    return out


@dataclass
class MultipleChoiceTask:
    name: str
    records: list[dict]
    prompt: str
    """Format template over the record: the context, e.g. ``"Question: {question}\\nAnswer:"``."""
    choices: Union[list[str], str]
    """A list of continuation templates formatted with the record (``[" yes", " no"]``, ``[" {holding_0}", ...]``)
    or the name of a record field holding the list of choices (each prefixed with ``delimiter``)."""
    label: str
    """Record field with the answer: an int index (or digit string), or a string equal to one of the choices."""
    normalize: Union[str, bool] = "token"
    """Headline ``score`` (unless ``calibrate``): ``"token"`` = ``accuracy_per_token``, ``"char"`` =
    ``accuracy_per_char`` (lm-eval's ``acc_norm``), ``"none"`` = ``accuracy``. The booleans of older
    configs still work: True = ``"token"`` (what it meant), False = ``"none"``."""
    preprocess: Optional[Callable[[dict], dict]] = None
    delimiter: str = " "
    calibrate: bool = False
    """Also score each choice after ``neutral_prompt`` and report ``accuracy_calibrated`` (then the headline)."""
    neutral_prompt: str = "Answer:"

    def __post_init__(self) -> None:
        self.normalize = normalization(self.normalize, f"task {self.name!r}")

    @property
    def headline(self) -> str:
        """The metric ``score`` reports."""
        return "accuracy_calibrated" if self.calibrate else HEADLINES[self.normalize]

    def choice_chars(self, continuation: str) -> int:
        """Characters of a choice without the leading delimiter (lm-eval's ``len(choice)``), at least 1."""
        text = continuation[len(self.delimiter):] if self.delimiter and continuation.startswith(self.delimiter) else continuation
        return max(1, len(text))

    @classmethod
    def from_source(cls, name: str, source: TextSource, prompt: str, choices: Union[list[str], str], label: str,
                    **kwargs) -> "MultipleChoiceTask":
        """A task over the records of a local jsonl/json/parquet/csv file or a ``datasets`` hub dataset."""
        return cls(name, load_records(source), prompt, choices, label, **kwargs)

    def instances(self) -> list[tuple[str, list[str], int]]:
        """``(context, continuations, label index)`` per record, with clear errors for bad records."""
        if not self.records:
            raise ValueError(f"task {self.name!r} has no records")
        out = []
        for i, raw in enumerate(self.records):
            record = self.preprocess(dict(raw)) if self.preprocess else dict(raw)
            context = _format(self.prompt, record, self.name, "prompt")
            if isinstance(self.choices, str):
                if self.choices not in record:
                    raise ValueError(f"task {self.name!r}: choices field {self.choices!r} not in record {i}; fields: {sorted(record)}")
                conts = [self.delimiter + str(c) for c in record[self.choices]]
            else:
                conts = [_format(c, record, self.name, "choice") for c in self.choices]
            if not conts:
                raise ValueError(f"task {self.name!r}: record {i} has no choices")
            if self.label not in record:
                raise ValueError(f"task {self.name!r}: label field {self.label!r} not in record {i}; fields: {sorted(record)}")
            out.append((context, conts, self._label_index(record[self.label], conts, i)))
        return out

    def _label_index(self, value, conts: list[str], i: int) -> int:
        if isinstance(value, str):
            for cand, v in ((conts, value), ([c.strip() for c in conts], value.strip())):
                if v in cand:
                    return cand.index(v)
            if not value.strip().lstrip("-").isdigit():
                raise ValueError(f"task {self.name!r}: label {value!r} of record {i} is not among the choices {conts}")
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"task {self.name!r}: label {value!r} of record {i} is neither an index nor a choice string")
        if not 0 <= value < len(conts):
            raise ValueError(f"task {self.name!r}: label {value} of record {i} is out of range for {len(conts)} choices")
        return value


def _pubmedqa_record(record: dict) -> dict:
    """Hub records (``question``, ``context`` dict) and the PQA-L json export (``QUESTION``, ``CONTEXTS``) alike."""
    if "question" not in record and "QUESTION" in record:
        record["question"] = record["QUESTION"]
    if "context" not in record and "CONTEXTS" in record:
        record["context"] = record["CONTEXTS"]
    ctx = record.get("context")
    if isinstance(ctx, dict):  # hub version: {"contexts": [...], "labels": [...], "meshes": [...]}
        record["context"] = " ".join(ctx.get("contexts", []))
    elif isinstance(ctx, list):
        record["context"] = " ".join(map(str, ctx))
    return record


def pubmedqa(records: list[dict], normalize: Union[str, bool] = "token", **kwargs) -> MultipleChoiceTask:
    """PubMedQA (e.g. ``qiaojin/PubMedQA``, ``pqa_labeled``): yes / no / maybe from question + abstract."""
    return MultipleChoiceTask("pubmedqa", records, "Question: {question}\nContext: {context}\nAnswer:",
                              [" yes", " no", " maybe"], "final_decision", normalize, _pubmedqa_record, **kwargs)


def casehold(records: list[dict], normalize: Union[str, bool] = "token", **kwargs) -> MultipleChoiceTask:
    """CaseHOLD (``casehold/casehold``): which of five holdings the citing prompt refers to."""
    return MultipleChoiceTask("casehold", records, "{citing_prompt}", [f" {{holding_{i}}}" for i in range(5)],
                              "label", normalize, **kwargs)


# -- scoring -------------------------------------------------------------------------------------------
def _token_ids(tokenizer, context: str, continuations: Sequence[str], max_length: int) -> tuple[list[int], list[list[int]]]:
    """Context ids (BOS/EOS when the context is empty, so the first choice token has a condition) and choice ids."""
    ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
    if not ctx:
        ctx = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    conts = []
    for c in continuations:
        cont = tokenizer(c, add_special_tokens=False)["input_ids"]
        if not cont:
            raise ValueError(f"choice {c!r} tokenises to no token")
        if len(cont) > max_length:
            raise ValueError(f"choice {c[:40]!r}... has {len(cont)} tokens, more than max_length={max_length}")
        conts.append(cont)
    return ctx, conts


def _picked_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., target] without materialising a second vocabulary-sized tensor."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _score_full(model, ctx: list[int], conts: list[list[int]], max_length: int, pad: int, device) -> list[float]:
    """The reference path: one right-padded row of (left-truncated) context + choice per choice."""
    rows = [(ctx + cont)[-(max_length + 1):][:-1] for cont in conts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    out = []
    for i, (r, cont) in enumerate(zip(rows, conts)):
        positions = torch.arange(len(r) - len(cont), len(r), device=logits.device)  # position t predicts token t + 1
        out.append(_picked_logprobs(logits[i, positions], torch.tensor(cont, device=logits.device)).sum().item())
    return out


def _forward_params(model) -> set:
    return set(inspect.signature(model.forward).parameters)


def _score_cached(model, ctx: list[int], conts: list[list[int]], pad: int, device) -> list[float]:
    """Run ``ctx`` once, repeat its KV cache once per choice, then run all choices (minus their last
    token) as one right-padded batch placed at positions ``len(ctx)...`` after the cached context."""
    params = _forward_params(model)
    cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x renamed it
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    out = model(input_ids=torch.tensor([ctx], device=device), use_cache=True, **keep)
    cache = getattr(out, "cache", None)
    cache = getattr(out, "past_key_values", None) if cache is None else cache
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        raise TypeError(f"{type(model).__name__} returned no repeatable KV cache ({type(cache).__name__})")
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts every choice's first token
    scores = [first[c[0]].item() for c in conts]
    width = max(len(c) for c in conts) - 1
    if width == 0:  # single-token choices: the context forward said everything
        return scores
    n, length = len(conts), len(ctx)
    cache.batch_repeat_interleave(n)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, length + width), dtype=torch.long)
    mask[:, :length] = 1
    for i, c in enumerate(conts):
        ids[i, : len(c) - 1] = torch.tensor(c[:-1])
        mask[i, length: length + len(c) - 1] = 1
    positions = torch.arange(length, length + width).expand(n, width)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   use_cache=True, **{cache_kw: cache}).logits
    for i, c in enumerate(conts):
        if len(c) > 1:
            steps = torch.arange(len(c) - 1, device=logits.device)
            scores[i] += _picked_logprobs(logits[i, steps], torch.tensor(c[1:], device=logits.device)).sum().item()
    return scores


def _windows(ctx: list[int], conts: list[list[int]], max_length: int) -> dict[int, list[int]]:
    """Choices grouped by the first context token they keep after left truncation (``(ctx + cont)[-(max_length+1):]``):
    without truncation one group; with it, choices of different lengths keep different context windows."""
    groups: dict[int, list[int]] = {}
    for i, cont in enumerate(conts):
        groups.setdefault(max(0, len(ctx) + len(cont) - (max_length + 1)), []).append(i)
    return groups


def _score_cached_windows(model, ctx: list[int], conts: list[list[int]], max_length: int, pad: int, device) -> list[float]:
    scores = [0.0] * len(conts)
    for start, members in _windows(ctx, conts, max_length).items():
        for i, s in zip(members, _score_cached(model, ctx[start:], [conts[i] for i in members], pad, device)):
            scores[i] = s
    return scores


_CACHE_CHECKED: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()
"""Per model: whether the cached path reproduced the full path on the first record it scored."""


def _cache_tolerance(model) -> float:
    dtype = next(model.parameters()).dtype
    return 1e-3 if dtype in (torch.float32, torch.float64) else 0.1


def _cache_works(model, ctx, conts, max_length, pad, device) -> tuple[bool, Optional[list[float]]]:
    """Check the cached path once per model against the full path: ``(usable, scores of this record)``."""
    if model in _CACHE_CHECKED:
        return _CACHE_CHECKED[model], None
    reference = _score_full(model, ctx, conts, max_length, pad, device)
    try:
        cached = _score_cached_windows(model, ctx, conts, max_length, pad, device)
        per_token = max(abs(a - b) / len(c) for a, b, c in zip(cached, reference, conts))
        ok = per_token <= _cache_tolerance(model)
        if not ok:
            log.debug("%s: KV-cached choice scores differ from full forwards by %.3g per token; using full forwards",
                      type(model).__name__, per_token)
    except Exception as err:  # any architecture whose cache API does not fit: the full path still works
        log.debug("%s: KV-cached choice scoring failed (%s: %s); using full forwards", type(model).__name__,
                  type(err).__name__, err)
        ok = False
    _CACHE_CHECKED[model] = ok
    return ok, reference


@torch.no_grad()
def score_choices(model, tokenizer, context: str, continuations: list[str], max_length: int = 512,
                  device=None, use_cache: Optional[bool] = None) -> list[tuple[float, int]]:
    """``(sum of log-probs, number of tokens)`` of each continuation given ``context``.

    Each context + choice is cut from the left to ``max_length`` input tokens. ``use_cache``: None
    (default) uses the KV-cached path when a one-time check on this model agrees with full forwards and
    there are two choices or more (one choice runs faster as one forward); True forces the cached
    path, False one padded full forward of all the choices.
    """
    device = device or next(model.parameters()).device
    ctx, conts = _token_ids(tokenizer, context, continuations, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if use_cache is None:
        works, checked = _cache_works(model, ctx, conts, max_length, pad, device)
        if checked is not None:
            return list(zip(checked, map(len, conts)))
        use_cache = works and len(conts) > 1
    if use_cache:
        scores = _score_cached_windows(model, ctx, conts, max_length, pad, device)
    else:
        scores = _score_full(model, ctx, conts, max_length, pad, device)
    return list(zip(scores, map(len, conts)))


# -- metrics -------------------------------------------------------------------------------------------
def macro_f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Mean per-class F1 over the classes present in ``labels`` or ``predictions``: unlike accuracy it
    drops when a pruned model collapses onto the majority answer (PubMedQA is 55% "yes")."""
    if len(labels) != len(predictions) or not labels:
        raise ValueError(f"macro_f1 needs as many predictions as labels (>0); got {len(labels)} and {len(predictions)}")
    f1s = []
    for cls in sorted(set(labels) | set(predictions)):
        tp = sum(1 for y, p in zip(labels, predictions) if y == cls and p == cls)
        fp = sum(1 for y, p in zip(labels, predictions) if y != cls and p == cls)
        fn = sum(1 for y, p in zip(labels, predictions) if y == cls and p != cls)
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


def bootstrap_ci(correct: Sequence[Union[bool, float]], n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> list[float]:
    """Percentile bootstrap interval ``[lo, hi]`` of the mean of ``correct`` (seeded, so reruns agree):
    with 100-500 items a difference of a few points between two pruned models is often noise."""
    values = np.asarray([float(c) for c in correct])
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < confidence < 1 or n_resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and n_resamples >= 1; got {confidence}, {n_resamples}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return [float(lo), float(hi)]


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def _summary(name: str, labels: list[int], predictions: list[int]) -> dict:
    """``<name>``, ``<name>_ci`` and the macro-F1 of one way of picking the answer."""
    correct = [p == y for p, y in zip(predictions, labels)]
    f1_key = name.replace("accuracy", "macro_f1")
    return {name: sum(correct) / len(correct), f"{name}_ci": bootstrap_ci(correct), f1_key: macro_f1(labels, predictions)}


def evaluate_multiple_choice(model, tokenizer, task: MultipleChoiceTask, max_length: int = 512, device=None,
                             return_details: bool = False) -> dict:
    """``accuracy`` (argmax of raw log-likelihood), ``accuracy_per_token``, ``accuracy_per_char``
    (lm-eval's ``acc_norm``) and ``accuracy_calibrated`` (``task.calibrate``), each with its macro-F1
    (``macro_f1``, ``macro_f1_per_token``, ...) and bootstrap interval (``*_ci``).

    ``score`` is the metric :attr:`MultipleChoiceTask.headline` names (``score_metric``). With
    ``return_details``, ``details`` lists per record the label, the raw scores and the token and
    character counts of the choices. (One entry point for both task kinds, summaries included:
    :func:`dpruner_lightning.tasks.evaluate_task`.)
    """
    instances = task.instances()
    was_training = model.training
    model.eval()
    labels, details = [], []
    picks: dict[str, list[int]] = {"accuracy": [], "accuracy_per_token": [], "accuracy_per_char": [], "accuracy_calibrated": []}
    neutral: dict[tuple[str, ...], list[float]] = {}  # one neutral scoring per distinct choice list
    try:
        for context, conts, label in instances:
            scored = score_choices(model, tokenizer, context, conts, max_length, device)
            raw = [s for s, _ in scored]
            chars = [task.choice_chars(c) for c in conts]
            labels.append(label)
            picks["accuracy"].append(_argmax(raw))
            picks["accuracy_per_token"].append(_argmax([s / n for s, n in scored]))
            picks["accuracy_per_char"].append(_argmax([s / n for s, n in zip(raw, chars)]))
            detail = {"label": label, "scores": raw, "n_tokens": [n for _, n in scored], "n_chars": chars}
            if task.calibrate:
                key = tuple(conts)
                if key not in neutral:
                    neutral[key] = [s for s, _ in score_choices(model, tokenizer, task.neutral_prompt, conts, max_length, device)]
                picks["accuracy_calibrated"].append(_argmax([s - b for s, b in zip(raw, neutral[key])]))
                detail["neutral_scores"] = neutral[key]
            details.append(detail)
    finally:
        model.train(was_training)
    result: dict = {"task": task.name, "n": len(instances)}
    for name, predictions in picks.items():
        if predictions:
            result.update(_summary(name, labels, predictions))
    metric = task.headline
    result.update(score=result[metric], score_ci=result[f"{metric}_ci"], score_metric=metric)
    if return_details:
        result["details"] = details
    return result
