"""Domain task accuracy by multiple-choice log-likelihood (the lm-eval-harness way, our own code).

For each record, the prompt (a format template over the record) is the context and each choice a
continuation. A choice's score is the sum of the log-probabilities of its tokens given the context;
the context and the continuation are tokenised SEPARATELY and the ids concatenated, so the scored tokens
are exactly the choice's tokens. ``accuracy`` picks the highest raw score, ``accuracy_norm`` the highest
score per continuation token. The choices of one record run as one right-padded batch.

    task = pubmedqa(records)                  # or MultipleChoiceTask(name, records, prompt, choices, label)
    evaluate_multiple_choice(model, tokenizer, task)   # {"accuracy", "accuracy_norm", "score", "n", ...}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from .data import TextSource, load_records


def _format(template: str, record: dict, task: str, what: str) -> str:
    try:
        return template.format(**record)
    except KeyError as err:
        raise ValueError(f"task {task!r}: {what} template field {err} not in the record; fields: {sorted(record)}") from err


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
    normalize: bool = True
    """Whether the headline ``score`` is the length-normalised accuracy (``accuracy_norm``)."""
    preprocess: Optional[Callable[[dict], dict]] = None
    delimiter: str = " "

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
    ctx = record.get("context")
    if isinstance(ctx, dict):  # hub version: {"contexts": [...], "labels": [...], "meshes": [...]}
        record["context"] = " ".join(ctx.get("contexts", []))
    elif isinstance(ctx, list):
        record["context"] = " ".join(map(str, ctx))
    return record


def pubmedqa(records: list[dict], normalize: bool = True) -> MultipleChoiceTask:
    """PubMedQA (e.g. ``qiaojin/PubMedQA``, ``pqa_labeled``): yes / no / maybe from question + abstract."""
    return MultipleChoiceTask("pubmedqa", records, "Question: {question}\nContext: {context}\nAnswer:",
                              [" yes", " no", " maybe"], "final_decision", normalize, _pubmedqa_record)


def casehold(records: list[dict], normalize: bool = True) -> MultipleChoiceTask:
    """CaseHOLD (``casehold/casehold``): which of five holdings the citing prompt refers to."""
    return MultipleChoiceTask("casehold", records, "{citing_prompt}", [f" {{holding_{i}}}" for i in range(5)],
                              "label", normalize)


@torch.no_grad()
def score_choices(model, tokenizer, context: str, continuations: list[str], max_length: int = 512,
                  device=None) -> list[tuple[float, int]]:
    """``(sum of log-probs, number of tokens)`` of each continuation given ``context``, in one batch."""
    device = device or next(model.parameters()).device
    ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
    if not ctx:  # nothing to condition on: start from BOS / EOS
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx = [start]
    rows, conts = [], []
    for c in continuations:
        cont = tokenizer(c, add_special_tokens=False)["input_ids"]
        if not cont:
            raise ValueError(f"choice {c!r} tokenises to no token")
        if len(cont) > max_length:
            raise ValueError(f"choice {c[:40]!r}... has {len(cont)} tokens, more than max_length={max_length}")
        full = (ctx + cont)[-(max_length + 1):]  # truncate from the left
        rows.append(full[:-1])
        conts.append(cont)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1).cpu()
    out = []
    for i, (r, cont) in enumerate(zip(rows, conts)):
        n = len(cont)
        positions = torch.arange(len(r) - n, len(r))  # position t predicts token t + 1
        out.append((logprobs[i, positions, torch.tensor(cont)].sum().item(), n))
    return out


def evaluate_multiple_choice(model, tokenizer, task: MultipleChoiceTask, max_length: int = 512, device=None,
                             return_details: bool = False) -> dict:
    """Accuracy (argmax of raw log-likelihood) and ``accuracy_norm`` (of log-likelihood per token).

    ``score`` is ``accuracy_norm`` when ``task.normalize`` else ``accuracy``. With ``return_details``,
    ``details`` lists per record the label, the raw scores and the token counts of the choices.
    """
    instances = task.instances()
    was_training = model.training
    model.eval()
    correct = correct_norm = 0
    details = []
    try:
        for context, conts, label in instances:
            scored = score_choices(model, tokenizer, context, conts, max_length, device)
            raw = [s for s, _ in scored]
            norm = [s / n for s, n in scored]
            correct += int(max(range(len(raw)), key=raw.__getitem__) == label)
            correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == label)
            details.append({"label": label, "scores": raw, "n_tokens": [n for _, n in scored]})
    finally:
        model.train(was_training)
    n = len(instances)
    result = {"task": task.name, "accuracy": correct / n, "accuracy_norm": correct_norm / n, "n": n}
    result["score"] = result["accuracy_norm"] if task.normalize else result["accuracy"]
    if return_details:
        result["details"] = details
    return result
