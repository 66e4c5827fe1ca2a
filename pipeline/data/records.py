"""Records into text, for preprocess: a text column, a template over a record's fields, a dialogue
rendered with speaker labels (or the tokenizer's chat template), or a prompt/response pair for
supervised fine-tuning; then cleaning (strip, drop short, exact de-duplication).

Every shape becomes the columns `text` (and, for prompt/response, `prompt`: the leading part of
`text` that is kept out of the loss)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.core.common import template_fields
from pipeline.core.config import DataConfig, PreprocessConfig
from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

TURN_SPEAKER = ("speaker", "role", "from", "author")
TURN_TEXT = ("text", "content", "utterance", "value", "message")


def required_columns(data: DataConfig) -> dict[str, list[str]]:
    """Which record fields each configured shape needs, by the param that names them."""
    if data.prompt_template:
        return {"data.prompt_template": template_fields(data.prompt_template),
                "data.response_template": template_fields(data.response_template or "")}
    if data.template:
        return {"data.template": template_fields(data.template)}
    if data.dialogue_column:
        return {"data.dialogue_column": [data.dialogue_column]}
    return {"data.text_column": [data.text_column]}


def check_columns(columns: list[str], data: DataConfig, csv: bool = False) -> None:
    """One clear line when a field the params name is missing from the records."""
    for param, fields in required_columns(data).items():
        missing = [f for f in fields if f not in columns]
        if missing:
            hint = ("; if the CSV file has no header row, add one naming the columns" if csv else "")
            shown = ", ".join(str(c)[:40] for c in columns[:8]) + (f", … ({len(columns)} in all)" if len(columns) > 8
                                                                  else "")
            raise PipelineError(f"{param}: field {missing[0]!r} is not in the records; they have "
                                f"{shown or 'no fields'}{hint}")


def _value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value)
    return str(value)


def not_text(value: Any) -> str:
    """Why a record's text field is not text ("" where it is): missing (null), or another kind of value
    (a number, list, mapping or bytes), which would become text nobody wrote."""
    if value is None:
        return "missing_text"
    return "" if isinstance(value, str) else "not_text"


def template_problem(record: dict, fields: list[str]) -> str:
    """Why a record cannot fill a template: a field that is a mapping or bytes (lists are joined with
    ", ", nulls are empty, numbers are written out)."""
    return next(("not_text" for f in fields if isinstance(record.get(f), (dict, bytes, bytearray))), "")


def fill(template: str, record: dict) -> str:
    return template.format(**{k: _value(v) for k, v in record.items()})


def dialogue_turns(turns: Any, speakers: list[str]) -> list[tuple[str, str]]:
    """(speaker, text) pairs from the common dialogue layouts."""
    if isinstance(turns, dict):  # a dict of lists, e.g. schema-guided dialogue: {"speaker": [...], "utterance": [...]}
        keys = list(turns)
        turns = [dict(zip(keys, values, strict=False)) for values in zip(*turns.values(), strict=False)]
    pairs = []
    for i, turn in enumerate(turns or []):
        if isinstance(turn, str):
            pairs.append((speakers[i % len(speakers)], turn))
            continue
        if not isinstance(turn, dict):
            raise PipelineError(f"data.dialogue_column: a turn is {type(turn).__name__} {str(turn)[:40]!r}, not a "
                                f"string or a mapping with a text field ({', '.join(TURN_TEXT)})")
        speaker = next((turn[k] for k in TURN_SPEAKER if k in turn), i % len(speakers))
        text = next((turn[k] for k in TURN_TEXT if k in turn), None)
        if text is None:
            raise PipelineError(f"data.dialogue_column: a turn has no text field ({', '.join(TURN_TEXT)}); it has "
                                f"{', '.join(turn)}")
        if isinstance(speaker, int):
            speaker = speakers[speaker % len(speakers)]
        pairs.append((str(speaker), str(text)))
    return pairs


def text_hash(text: str) -> int:
    """A 63-bit content hash for exact de-duplication."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def renderer(data: DataConfig, cfg: PreprocessConfig, tokenizer: PreTrainedTokenizerBase
             ) -> Callable[[dict[str, list]], dict[str, list]]:
    """A batched function from records to `text` (and `prompt`) columns, stripped when preprocess.strip,
    with a `text_hash` column when preprocess.dedup, and `bad`: why a record has no text of its own
    ("missing_text", "not_text"; "" for a good one), for drop_bad_records."""
    if data.use_chat_template and data.dialogue_column and not getattr(tokenizer, "chat_template", None):
        raise PipelineError("data.use_chat_template: the tokenizer has no chat template (GPT-2 has none); set it "
                            "to false to use speaker labels")

    def records(batch: dict[str, list]) -> list[dict]:
        keys = list(batch)
        return [dict(zip(keys, values, strict=True)) for values in zip(*batch.values(), strict=True)]

    def texts(batch: dict[str, list]) -> dict[str, list]:
        if data.prompt_template:
            rows = records(batch)
            prompts = [fill(data.prompt_template, r) for r in rows]
            return {"prompt": prompts,
                    "text": [p + fill(data.response_template or "", r) for p, r in zip(prompts, rows, strict=True)]}
        if data.template:
            rows, fields = records(batch), template_fields(data.template)
            bad = [template_problem(r, fields) for r in rows]
            return {"text": ["" if b else fill(data.template, r) for r, b in zip(rows, bad, strict=True)], "bad": bad}
        if data.dialogue_column:
            out = []
            for turns in batch[data.dialogue_column]:
                if isinstance(turns, str):
                    raise PipelineError(f"data.dialogue_column: {data.dialogue_column!r} holds text, not a list of "
                                        "turns; point data.text_column at it instead")
                pairs = dialogue_turns(turns, data.speakers)
                if data.use_chat_template:
                    messages = [{"role": s.lower(), "content": t} for s, t in pairs]
                    out.append(tokenizer.apply_chat_template(messages, tokenize=False))
                else:
                    out.append("\n".join(f"{s}: {t}" for s, t in pairs))
            return {"text": out}
        bad = [not_text(t) for t in batch[data.text_column]]
        return {"text": [t if not b else "" for t, b in zip(batch[data.text_column], bad, strict=True)], "bad": bad}

    def render(batch: dict[str, list]) -> dict[str, list]:
        out = {"bad": [""] * len(next(iter(batch.values()), [])), **texts(batch)}
        if cfg.strip:
            out["text"] = [t.strip() for t in out["text"]]
            if "prompt" in out:
                out["prompt"] = [p.lstrip() for p in out["prompt"]]
        if cfg.dedup:
            out["text_hash"] = [text_hash(t) for t in out["text"]]
        return out

    return render


BAD_RECORDS = {"missing_text": "no text (null or absent)", "not_text": "a text field that is not text (a number, "
                                                                       "list, mapping or bytes)"}


def drop_bad_records(docs: Dataset, split: str, policy: str, key: str = "preprocess.bad_records",
                     reasons: dict[str, str] = BAD_RECORDS) -> tuple[Dataset, dict[str, int]]:
    """The records with nothing in their `bad` column, and how many were dropped per reason (`reasons`:
    the reason -> what the record lacks); with `policy` "refuse" (the param `key`), one line naming the
    first bad record instead. Shared by the language model (reasons from render) and the classifier
    (and its labels: pipeline.tasks.classification.preprocess)."""
    from collections import Counter

    seen = Counter(docs["bad"])
    counts = {f"{reason}_dropped": seen.get(reason, 0) for reason in reasons}
    first = next((i for i, reason in enumerate(docs["bad"]) if reason), None)
    if first is not None and policy == "refuse":
        raise PipelineError(f"{key}: record {first} of the {split} split has {reasons[docs['bad'][first]]} "
                            f"({sum(counts.values())} such records); fix the data, or set {key}: drop")
    if first is not None:
        docs = docs.filter(lambda b: [not r for r in b["bad"]], batched=True, desc="drop records without text")
    return docs.remove_columns("bad"), counts


def clean(docs: Dataset, cfg: PreprocessConfig, seen: set | None = None) -> tuple[Dataset, dict, set]:
    """Drop documents shorter than min_chars and exact duplicates (within the split, and of `seen`:
    the training split's hashes, when cleaning validation and test). Returns the kept documents, the
    counts, and the kept documents' hashes (None without dedup)."""
    import numpy as np

    counts = {"short_or_empty_dropped": 0, "duplicates_dropped": 0, "seen_in_train_dropped": 0}
    if cfg.min_chars:
        before = len(docs)
        docs = docs.filter(lambda b: [len(t) >= cfg.min_chars for t in b["text"]], batched=True,
                           desc="drop short documents")
        counts["short_or_empty_dropped"] = before - len(docs)
    if not cfg.dedup:
        return docs, counts, None
    hashes = np.asarray(docs.with_format("numpy")["text_hash"], dtype=np.int64)
    keep = np.zeros(len(hashes), dtype=bool)
    keep[np.unique(hashes, return_index=True)[1]] = True
    counts["duplicates_dropped"] = int(len(hashes) - keep.sum())
    if seen is not None:
        in_train = keep & np.isin(hashes, seen)
        counts["seen_in_train_dropped"] = int(in_train.sum())
        keep &= ~in_train
    docs = docs.select(np.flatnonzero(keep)).remove_columns("text_hash")
    return docs, counts, hashes[keep]
