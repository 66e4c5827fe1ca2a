"""The preprocess stage for task: classification. Records become a text (as for the language model:
a text column or a template) and a label id; a record whose label is missing or unknown, or whose
text is empty, is counted and dropped (or refused); the validation split, when the data has none,
is split off stratified by label. Each text is one block: truncated to preprocess.block_size tokens
and padded to it with a pad token of its own (never EOS, so a text that ends in EOS keeps it as its
last real token), with its attention mask, and position ids where the padding is on the left.

Output columns: input_ids, attention_mask, labels (the label id) [, position_ids]; the label names go
to the data's provenance (data/processed/provenance.json), from where train, evaluate and generate
read them.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from pipeline.core.common import digest
from pipeline.core.config import ClassifyConfig, DataConfig, Params, PreprocessConfig
from pipeline.core.errors import PipelineError
from pipeline.data.lengths import check_block_size, histogram_rows, length_stats
from pipeline.data.records import check_columns, clean, drop_bad_records, renderer
from pipeline.data.splits import split_documents

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
BAD_REASONS = {"missing_label": "no label", "unknown_label": "a label that is not one of the labels",
               "empty_text": "no text", "missing_text": "no text field (null or absent)",
               "not_text": "a text field that is not text (a number, list, mapping or bytes)"}


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id texts are padded with: the tokenizer's own pad token where it has one that is not EOS,
    else the first id past its vocabulary, which the train stage gives to an added "<|pad|>" token."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer.pad_token_id
    return len(tokenizer)


def label_names(train: Dataset, c: ClassifyConfig) -> list[str]:
    """classify.labels, else the label column's ClassLabel names, else its sorted distinct values."""
    if c.labels is not None:
        return list(c.labels)
    feature = train.features.get(c.label_column)
    if getattr(feature, "names", None):
        return list(feature.names)
    values = sorted({str(v) for v in train[c.label_column] if v is not None and str(v).strip() != ""})
    if len(values) < 2:
        raise PipelineError(f"classify.label_column: {c.label_column!r} has {len(values)} distinct label(s) in the "
                            "training split; a classifier needs at least 2 (check the column, or list classify.labels)")
    return values


def label_id(value: Any, names: list[str], class_label: bool) -> int | str:
    """The id of a record's label, or the reason it has none (one of BAD_REASONS)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "missing_label"
    if class_label and isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < len(names) else "unknown_label"
    text = str(value).strip()
    return names.index(text) if text in names else "unknown_label"


def labelled(docs: Dataset, names: list[str], data: DataConfig, cfg: PreprocessConfig, c: ClassifyConfig,
             tokenizer: PreTrainedTokenizerBase, class_label: bool) -> Dataset:
    """Records to `text` and `label` (an id, or -1 with the reason in `bad`)."""
    render = renderer(data, cfg, tokenizer)

    def batch(rows: dict[str, list]) -> dict[str, list]:
        out = render(rows)
        text_bad = out.pop("bad")
        ids = [label_id(v, names, class_label) for v in rows[c.label_column]]
        bad = [i if isinstance(i, str) else (why or ("empty_text" if not t.strip() else ""))
               for i, t, why in zip(ids, out["text"], text_bad, strict=True)]
        return {**out, "label": [i if isinstance(i, int) else -1 for i in ids], "bad": bad}

    return docs.map(batch, batched=True, batch_size=cfg.batch_size, remove_columns=docs.column_names,
                    desc="records to text and label", new_fingerprint=digest([docs._fingerprint, repr(data),
                                                                              repr(cfg), repr(c), names]))


def blocks_of(texts: list[str], tokenizer: PreTrainedTokenizerBase, size: int, add_eos: bool, padding_side: str
              ) -> dict[str, list]:
    """Texts as padded blocks of `size` tokens (input_ids, attention_mask [, position_ids]) and their
    lengths before they were cut to it: how preprocess writes them, and how generate classifies texts."""
    pad, eos = pad_token_id(tokenizer), [tokenizer.eos_token_id] if add_eos else []
    ids = [x + eos for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    out: dict[str, list] = {"input_ids": [], "attention_mask": [], "length": [len(x) for x in ids]}
    right = padding_side == "right"
    for x in ids:
        x = x[:size]
        filler, mask = [pad] * (size - len(x)), [1] * len(x)
        out["input_ids"].append(x + filler if right else filler + x)
        out["attention_mask"].append(mask + [0] * len(filler) if right else [0] * len(filler) + mask)
    if not right:  # GPT-2's absolute positions start at the text, not at the padding
        out["position_ids"] = [[max(0, j - (size - sum(m))) for j in range(size)] for m in out["attention_mask"]]
    return out


def encode(docs: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: PreprocessConfig, c: ClassifyConfig
           ) -> tuple[Dataset, list[int]]:
    """Each text as one padded block; and every text's length in tokens before it was cut to block_size."""

    def batch(rows: dict[str, list]) -> dict[str, list]:
        return {**blocks_of(rows["text"], tokenizer, cfg.block_size, cfg.add_eos, c.padding_side),
                "labels": rows["labels"]}

    encoded = docs.map(batch, batched=True, batch_size=cfg.batch_size, remove_columns=docs.column_names,
                       desc="tokenize", new_fingerprint=digest([docs._fingerprint, len(tokenizer), cfg.block_size,
                                                                cfg.add_eos, repr(c)]))
    return encoded.remove_columns("length"), encoded["length"]


def build_examples(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, data: DataConfig, cfg: PreprocessConfig,
                   c: ClassifyConfig, seed: int, csv: bool = False
                   ) -> tuple[DatasetDict, dict, list[str], dict[str, list[int]]]:
    """The processed DatasetDict, per-split stats, the label names, and each split's text lengths in
    tokens (before they were cut to block_size)."""
    import datasets

    train = raw[data.train_split]
    check_columns(train.column_names, data, csv)
    if c.label_column not in train.column_names:
        raise PipelineError(f"classify.label_column: {c.label_column!r} is not in the records; they have "
                            f"{', '.join(train.column_names)}")
    names = label_names(train, c)
    class_label = bool(getattr(train.features.get(c.label_column), "names", None))
    tokenizer.model_max_length = int(1e30)  # texts are cut to block_size below, not by the tokenizer
    labelled_splits, stats = {}, {}
    for name, docs in raw.items():
        docs, counts, _ = clean(labelled(docs, names, data, cfg, c, tokenizer, class_label), cfg)
        docs, bad = drop_bad_records(docs, name, c.bad_rows, "classify.bad_rows", BAD_REASONS)
        labelled_splits[name], stats[name] = docs.rename_column("label", "labels"), {**counts, **bad}
    processed, lengths = {}, {}
    splits = split_documents(datasets.DatasetDict(labelled_splits), data, cfg.val_fraction, seed, names)
    for name, docs in splits.items():
        if len(docs) == 0:
            raise PipelineError(f"the {name} split has no labelled text left ({stats.get(name, {})}); check "
                                "data.dataset, classify.label_column and classify.labels")
        processed[name], lengths[name] = encode(docs, tokenizer, cfg, c)
        by_label = Counter(docs["labels"])
        stats.setdefault(name, {}).update({"examples": len(docs),
                                          "truncated": sum(n > cfg.block_size for n in lengths[name]),
                                          "label_counts": {names[i]: by_label.get(i, 0) for i in range(len(names))}})
    summary = {"task": "classification", "block_size": cfg.block_size, "labels": names,
               "padding_side": c.padding_side, "add_eos": cfg.add_eos}
    return datasets.DatasetDict(processed), {**summary, **stats}, names, lengths


def blocks(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, params: Params, context: int | None, csv: bool
           ) -> tuple[DatasetDict, dict, list[dict]]:
    """The task's blocks, stats and length histogram (the stage's interface): one padded text per block
    and its label id."""
    import numpy as np

    check_block_size(params.preprocess.block_size, context)
    processed, stats, names, lengths = build_examples(raw, tokenizer, params.data, params.preprocess, params.classify,
                                                      params.seed, csv)
    histogram = []
    for split, split_lengths in lengths.items():
        summary, counts = length_stats(np.asarray(split_lengths, dtype=np.int64))
        stats[split].update(summary)
        histogram += histogram_rows(split, counts)
        log.info("%s: %s", split, stats[split])
    return processed, stats, histogram
