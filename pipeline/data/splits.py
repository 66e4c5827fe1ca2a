"""Train / validation (/ test) splits of the records, for every task: the dataset's own validation split
where it has one, else a seeded `preprocess.val_fraction` of the training records (stratified by label
for a classifier, so each class is in both parts in proportion)."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from pipeline.core.config import DataConfig
from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict


def split_documents(raw: DatasetDict, data: DataConfig, val_fraction: float, seed: int,
                    labels: list[str] | None = None) -> dict[str, Dataset]:
    """The splits; with `labels` (the label names of a `labels` column), the held-out part is stratified."""
    train = raw[data.train_split]
    if data.validation_split and data.validation_split in raw:
        splits = {"train": train, "validation": raw[data.validation_split]}
    else:
        if labels is None:
            check_held_out(train.num_rows, val_fraction)
        else:
            train = stratifiable(train, labels)
        parts = train.train_test_split(test_size=val_fraction, seed=seed, shuffle=True,
                                       stratify_by_column="labels" if labels is not None else None)
        splits = {"train": parts["train"], "validation": parts["test"]}
    if "test" in raw and data.train_split != "test":
        splits["test"] = raw["test"]
    return splits


def check_held_out(documents: int, val_fraction: float) -> None:
    """Documents enough to hold `val_fraction` out and keep some to train on."""
    if documents < 2:
        raise PipelineError(f"the dataset has {documents} document(s) and no validation split, so none can "
                            "be split off; add documents, set data.txt_sample_by: paragraph, or provide a "
                            "validation split")
    held_out = math.ceil(documents * val_fraction)  # as train_test_split rounds a fraction
    if held_out >= documents:
        raise PipelineError(f"params: preprocess.val_fraction ({val_fraction:g}) of {documents} documents "
                            f"holds out {held_out}, leaving none to train on; lower it (at most "
                            f"{(documents - 1) / documents:.2f} here) or add documents")


def stratifiable(train: Dataset, names: list[str]) -> Dataset:
    """`train` with its `labels` column as a ClassLabel (what a stratified split needs), each label having
    at least 2 records."""
    import datasets

    counts = Counter(train["labels"])
    if min(counts.values()) < 2:
        rare = min(counts, key=counts.get)
        raise PipelineError(f"label {names[rare]!r} has {counts[rare]} training record(s), too few to split a "
                            "stratified validation set off; add records, drop the label from classify.labels, "
                            "or give the data a validation split")
    return train.cast_column("labels", datasets.ClassLabel(names=names))
