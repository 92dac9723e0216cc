"""Generation and title tasks, and the task presets ``dpruner compare`` evaluates every row on.

* :class:`SummarizationTask` + :func:`evaluate_summarization`: greedy decoding with the model's own
  ``generate`` and ROUGE-1/2/L F-measure (torchmetrics, without the nltk-only ``rougeLsum``);
  :func:`billsum` is the BillSum preset.
* :func:`pubmed_titles`: pick an abstract's true title among ``n_choices`` titles (the others are
  titles of other abstracts, drawn with a seeded RNG), never using a document the model was
  calibrated on, neither as the question nor as the source of a wrong title.
* :data:`PRESETS`, :func:`parse_task_specs`, :func:`build_task`, :func:`evaluate_task`: the
  ``compare.tasks`` list (preset name + where the records are + options), validated before any row runs.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from .corpora import pubmed_document
from .evaluation import MultipleChoiceTask, _format, bootstrap_ci, casehold, evaluate_multiple_choice, normalization, pubmedqa
from .sources import TextSource, _local_files, load_records

log = logging.getLogger(__name__)

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


# -- summarisation -------------------------------------------------------------------------------------
@dataclass
class SummarizationTask:
    name: str
    records: list[dict]
    prompt: str = "{source}\n\nSummary:"
    """Format template over the record; the ``source_field`` placeholder is truncated to fit."""
    reference: str = "summary"
    """Record field with the reference summary."""
    source_field: str = "source"
    max_new_tokens: int = 64
    preprocess: Optional[Callable[[dict], dict]] = None

    def __post_init__(self) -> None:
        if self.prompt.count("{" + self.source_field + "}") != 1:
            raise ValueError(f"task {self.name!r}: the prompt must contain {{{self.source_field}}} exactly once; got {self.prompt!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"task {self.name!r}: max_new_tokens must be >= 1; got {self.max_new_tokens}")


def billsum(records: list[dict], max_new_tokens: int = 64, **kwargs) -> SummarizationTask:
    """BillSum (``FiscalNote/billsum``): summarise a US bill (``source`` or the hub's ``text``) into ``summary``."""
    def _record(record: dict) -> dict:
        if "source" not in record and "text" in record:
            record["source"] = record["text"]
        return record

    return SummarizationTask("billsum", records, max_new_tokens=max_new_tokens, preprocess=_record, **kwargs)


def prompt_ids(tokenizer, task: SummarizationTask, record: dict, max_length: int) -> list[int]:
    """Prompt token ids with the source cut from the RIGHT so that prompt + ``max_new_tokens`` fit in
    ``max_length`` (the instruction after the source, e.g. "Summary:", must survive the cut)."""
    if task.source_field not in record:
        raise ValueError(f"task {task.name!r}: source field {task.source_field!r} not in the record; fields: {sorted(record)}")
    head, tail = task.prompt.split("{" + task.source_field + "}")
    head_ids = tokenizer(_format(head, record, task.name, "prompt"), add_special_tokens=True)["input_ids"]
    tail_ids = tokenizer(_format(tail, record, task.name, "prompt"), add_special_tokens=False)["input_ids"]
    source_ids = tokenizer(str(record[task.source_field]), add_special_tokens=False)["input_ids"]
    budget = max_length - task.max_new_tokens - len(head_ids) - len(tail_ids)
    if budget < 1:
        raise ValueError(f"task {task.name!r}: max_length={max_length} leaves no room for the source after "
                         f"{task.max_new_tokens} new tokens and a {len(head_ids) + len(tail_ids)}-token prompt")
    ids = head_ids + source_ids[:budget] + tail_ids
    return ids or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]


@torch.no_grad()
def greedy_generate(model, tokenizer, ids: list[int], max_new_tokens: int, device=None) -> str:
    """Greedy continuation of ``ids`` by the model's ``generate`` (KV-cached), decoded without specials.
    A fresh generation config keeps a checkpoint's sampling defaults (temperature, top_p) out of it."""
    from transformers import GenerationConfig

    device = device or next(model.parameters()).device
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=eos, pad_token_id=pad)
    inputs = torch.tensor([ids], device=device)
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=config)
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip()


def rouge_per_pair(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """ROUGE-1/2/L F-measure of each (prediction, reference) pair, by torchmetrics (no stemming)."""
    from torchmetrics.functional.text.rouge import rouge_score

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    out = []
    for p, r in zip(predictions, references):
        scores = rouge_score(p, r, rouge_keys=ROUGE_KEYS)
        out.append({k: float(scores[f"{k}_fmeasure"]) for k in ROUGE_KEYS})
    return out


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean per-pair ROUGE-1/2/L F-measure: what torchmetrics' ``ROUGEScore`` reports for the batch."""
    pairs = rouge_per_pair(predictions, references)
    return {k: sum(p[k] for p in pairs) / len(pairs) for k in ROUGE_KEYS}


def evaluate_summarization(model, tokenizer, task: SummarizationTask, max_length: int = 512, device=None,
                           return_details: bool = False) -> dict:
    """Greedy summaries of every record and their ROUGE against the references; ``score`` is ROUGE-L,
    with a bootstrap interval over records (``score_ci``)."""
    if not task.records:
        raise ValueError(f"task {task.name!r} has no records")
    was_training = model.training
    model.eval()
    predictions, references = [], []
    try:
        for raw in task.records:
            record = task.preprocess(dict(raw)) if task.preprocess else dict(raw)
            if task.reference not in record:
                raise ValueError(f"task {task.name!r}: reference field {task.reference!r} not in the record; fields: {sorted(record)}")
            ids = prompt_ids(tokenizer, task, record, max_length)
            predictions.append(greedy_generate(model, tokenizer, ids, task.max_new_tokens, device))
            references.append(str(record[task.reference]))
    finally:
        model.train(was_training)
    pairs = rouge_per_pair(predictions, references)
    result: dict[str, Any] = {"task": task.name, "n": len(pairs)}
    for key in ROUGE_KEYS:
        result[key] = sum(p[key] for p in pairs) / len(pairs)
    result.update(score=result["rougeL"], score_ci=bootstrap_ci([p["rougeL"] for p in pairs]), score_metric="rougeL")
    if return_details:
        result["details"] = [{"prediction": p, "reference": r, **s} for p, r, s in zip(predictions, references, pairs)]
    return result


# -- PubMed titles -------------------------------------------------------------------------------------
def _text_key(text: str) -> str:
    """Hash of a text with whitespace collapsed and case folded: a file re-wrapped or re-cased still matches."""
    return hashlib.sha1(" ".join(text.split()).casefold().encode("utf-8")).hexdigest()


def _exclusion_keys(texts: Iterable[str]) -> set[str]:
    """Keys of whole documents and, for ``title\\n\\nabstract`` documents (the ``pubmed`` sample), of the abstract."""
    keys = set()
    for text in texts:
        keys.add(_text_key(text))
        if "\n\n" in text:
            keys.add(_text_key(text.split("\n\n", 1)[1]))
    return keys


def _usable_titles(records: Sequence[dict], exclude: set[str]) -> list[dict]:
    """Records with a title and an abstract, not excluded, first copy of each title and each abstract."""
    pool, seen = [], set()
    for i, r in enumerate(records):
        if "title" not in r or "abstract" not in r:
            raise ValueError(f"pubmed_title: record {i} needs 'title' and 'abstract' fields; fields: {sorted(r)}")
        title, abstract = str(r["title"]).strip(), str(r["abstract"]).strip()
        keys = {_text_key(abstract), _text_key(pubmed_document(title, abstract))}
        ids = {"t:" + _text_key(title), "a:" + _text_key(abstract)}
        if title and abstract and not keys & exclude and not ids & seen:
            seen |= ids
            pool.append({"title": title, "abstract": abstract})
    return pool


def pubmed_titles(records: Sequence[dict], n: int = 200, seed: int = 0, exclude_texts: Iterable[str] = (),
                  n_choices: int = 4, normalize: Union[str, bool] = "token", **kwargs) -> MultipleChoiceTask:
    """``n`` questions "which title belongs to this abstract?" over ``{"title", "abstract"}`` records.

    A record whose abstract, or ``title\\n\\nabstract`` document, appears in ``exclude_texts`` (the
    calibration documents) is used neither as a question nor for a wrong title: the task then measures
    what the model kept, not what it was calibrated on. The true title's position is uniform; the same
    records and seed give the same task.
    """
    pool = _usable_titles(records, _exclusion_keys(exclude_texts))
    if len(pool) < n_choices:
        raise ValueError(f"pubmed_title: {len(pool)} usable records (after excluding calibration documents), "
                         f"need at least n_choices={n_choices}")
    if n > len(pool):
        log.warning("pubmed_title: %d questions asked, %d usable records: using all of them", n, len(pool))
    rng = random.Random(seed)
    items = []
    for q in rng.sample(range(len(pool)), min(n, len(pool))):
        others = [j + (j >= q) for j in rng.sample(range(len(pool) - 1), n_choices - 1)]  # any record but q
        label = rng.randrange(n_choices)
        titles = [pool[j]["title"] for j in others]
        titles.insert(label, pool[q]["title"])
        items.append({"abstract": pool[q]["abstract"], "titles": titles, "label": label})
    return MultipleChoiceTask("pubmed_title", items, "Abstract: {abstract}\nTitle:", "titles", "label", normalize, **kwargs)


# -- presets and compare.tasks -------------------------------------------------------------------------
_MC_OPTIONS = {"calibrate", "normalize", "neutral_prompt"}
PRESETS: dict[str, tuple[Callable[..., Any], set[str], bool]] = {
    # name: (builder over records, options it accepts, whether it needs a path or dataset)
    "pubmedqa": (pubmedqa, _MC_OPTIONS, True),
    "casehold": (casehold, _MC_OPTIONS, True),
    "billsum": (billsum, {"max_new_tokens"}, True),
    "pubmed_title": (pubmed_titles, _MC_OPTIONS | {"n", "seed", "n_choices"}, False),  # default: built-in records
}
_SOURCE_KEYS = {"path", "dataset", "subset", "split", "data_files"}
_COMMON_KEYS = {"name", "preset", "limit", "max_length"} | _SOURCE_KEYS


@dataclass
class TaskSpec:
    """One ``compare.tasks`` entry: a column ``name``, its preset, where its records are, and options."""

    name: str
    preset: str
    source: Optional[TextSource] = None
    options: dict = field(default_factory=dict)
    max_length: int = 512
    limit: Optional[int] = None


def _spec(entry: Any, where: str) -> TaskSpec:
    if not isinstance(entry, dict) or not entry.get("name"):
        raise ValueError(f"{where}: a task is a mapping with a 'name' (a preset: {sorted(PRESETS)}); got {entry!r}")
    name, preset = str(entry["name"]), str(entry.get("preset", entry["name"]))
    if preset not in PRESETS:
        raise ValueError(f"{where}: unknown task preset {preset!r}; use one of {sorted(PRESETS)} "
                         "(or name: <your label> with preset: <one of them>)")
    builder, options, needs_records = PRESETS[preset]
    unknown = set(entry) - _COMMON_KEYS - options
    if unknown:
        raise ValueError(f"{where} ({name}): unknown keys {sorted(unknown)}; allowed: {sorted(_COMMON_KEYS | options)}")
    if entry.get("path") and entry.get("dataset"):
        raise ValueError(f"{where} ({name}): give either path or dataset, not both")
    for key in ("limit", "max_length", "n", "max_new_tokens", "n_choices"):
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{where} ({name}): {key} must be a positive integer; got {value!r}")
    for key, kind in (("seed", int), ("calibrate", bool), ("neutral_prompt", str)):
        value = entry.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise ValueError(f"{where} ({name}): {key} must be a{'n' if kind is int else ''} {kind.__name__}; got {value!r}")
    if entry.get("normalize") is not None:  # token | char | none (true / false of older configs: token / none)
        normalization(entry["normalize"], f"{where} ({name})")
    source = None
    if entry.get("path") or entry.get("dataset"):
        try:
            if entry.get("path"):
                _local_files(str(entry["path"]))
        except FileNotFoundError as err:
            raise ValueError(f"{where} ({name}): path: {err}. Fix the path (relative paths start from the "
                             "current directory) or remove the task") from None
        # all records are read: ``limit`` draws a seeded subset in build_task (files are often sorted
        # by label, and their first N would then be one class)
        source = TextSource(**{k: entry[k] for k in _SOURCE_KEYS if entry.get(k) is not None})
    elif needs_records:
        raise ValueError(f"{where} ({name}): the {preset} task needs its records: add path: <file.jsonl> "
                         "(or dataset: <hub name> with split:)")
    opts = {k: v for k, v in entry.items() if k in options}
    return TaskSpec(name, preset, source, opts, int(entry.get("max_length") or 512), entry.get("limit"))


def parse_task_specs(entries: Any, where: str = "compare.tasks") -> list[TaskSpec]:
    """Validate a ``tasks`` list (presets, keys, files) before anything is computed."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise ValueError(f"{where} must be a list of tasks, e.g. [{{name: pubmedqa, path: data/pubmedqa.jsonl}}]; got {entries!r}")
    specs = [_spec(e, f"{where}[{i}]") for i, e in enumerate(entries)]
    names = [s.name for s in specs]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise ValueError(f"{where}: duplicate task names {dup}: give each entry its own name (and a preset:)")
    return specs


def build_task(spec: TaskSpec, exclude_texts: Iterable[str] = ()) -> Union[MultipleChoiceTask, SummarizationTask]:
    """The task of a spec: its records loaded (``limit``: a seeded random subset, in file order) and its
    preset applied."""
    builder = PRESETS[spec.preset][0]
    if spec.source is not None:
        records = load_records(spec.source)
        if spec.limit is not None and spec.limit < len(records):
            chosen = sorted(random.Random(0).sample(range(len(records)), spec.limit))
            records = [records[i] for i in chosen]
    else:  # only pubmed_title runs without a path: the titled documents of the built-in pubmed sample
        from .assets import pubmed_title_records

        records = pubmed_title_records()[: spec.limit]
    if spec.preset == "pubmed_title":
        task = builder(records, exclude_texts=exclude_texts, **spec.options)
    else:
        task = builder(records, **spec.options)
    task.name = spec.name
    return task


def calibration_documents(datamodule) -> dict[str, list[str]]:
    """Per calibration set, the documents a :class:`~dpruner_lightning.data.CalibrationDataModule`
    calibrates on (its seeded split; held-out documents may serve as questions: they are evaluation
    text already)."""
    return {name: docs for name, (docs, _) in datamodule.source_documents().items()}


def calibration_texts(datamodule) -> list[str]:
    """All calibration documents of a datamodule (both sets), for ``exclude_texts``."""
    return [doc for docs in calibration_documents(datamodule).values() for doc in docs]


def position_limit(model, max_length: int) -> int:
    """``max_length`` capped at the model's position table (tiny test models have 256 positions)."""
    config = getattr(model, "config", None)
    limits = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions")]
    limits = [v for v in limits if isinstance(v, int) and v > 0]
    return min([max_length, *limits])


def evaluate_task(model, tokenizer, task: Union[MultipleChoiceTask, SummarizationTask], max_length: int = 512,
                  device=None) -> dict:
    """Metrics of one task of either kind under ``torch.no_grad`` (no per-record details)."""
    evaluate = evaluate_summarization if isinstance(task, SummarizationTask) else evaluate_multiple_choice
    with torch.no_grad():
        return evaluate(model, tokenizer, task, max_length=position_limit(model, max_length), device=device)
