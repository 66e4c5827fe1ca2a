"""pipeline/preprocess.py: EOS between documents, one remainder per split, pad mode, the split,
the stats."""

from __future__ import annotations

import datasets
import pytest

from pipeline.core.common import IGNORE_INDEX
from pipeline.core.errors import PipelineError
from pipeline.data.splits import split_documents
from pipeline.tasks.causal_lm.preprocess import build_blocks, pack, pad, tokenize
from tests.conftest import data_params, prep_params

EOS = 50256


def docs(*texts: str) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": list(texts)})


def test_eos_after_every_nonempty_document(tokenizer):
    tokens = tokenize(docs("Hello world", "", "Hello"), tokenizer, add_eos=True, num_proc=1, batch_size=2)
    assert tokens["input_ids"] == [[15496, 995, EOS], [], [15496, EOS]]
    plain = tokenize(docs("Hello world", "Hello"), tokenizer, add_eos=False, num_proc=1, batch_size=2)
    assert plain["input_ids"] == [[15496, 995], [15496]]


def test_a_tokenizer_left_set_to_pad_does_not_pad_documents(tokenizer_dir):
    from pipeline.core.loading import load_tokenizer

    padding = load_tokenizer(tokenizer_dir)
    padding(["a longer text", "b"], padding=True)  # leaves its fast backend set to pad
    tokens = tokenize(docs("Hello world", "", "Hello"), padding, add_eos=True, num_proc=1, batch_size=2)
    assert tokens["input_ids"] == [[15496, 995, EOS], [], [15496, EOS]]


def test_tokenize_in_parallel_gives_the_same_ids(tokenizer):
    texts = [f"document number {i} has some words" for i in range(40)]
    one = tokenize(docs(*texts), tokenizer, True, num_proc=1, batch_size=7)
    two = tokenize(docs(*texts), tokenizer, True, num_proc=2, batch_size=7)
    assert one["input_ids"] == two["input_ids"]


def token_lists(*lists: list[int]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": list(lists)})


def test_pack_concatenates_across_documents_and_drops_one_remainder():
    blocks, stats = pack(token_lists([1, 2, 3], [4, 5], [6, 7, 8, 9], [10]), block_size=4, remainder="drop", pad_id=0)
    assert blocks["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert blocks["labels"] == blocks["input_ids"]
    assert stats == {"documents": 4, "tokens": 10, "blocks": 2, "dropped_tokens": 2, "padding_tokens": 0,
                     "truncated_tokens": 0}


def test_pack_carries_the_tail_of_each_batch_into_the_next():
    many = token_lists(*[[i, i + 1, i + 2] for i in range(0, 30_003, 3)])  # 10,001 documents: 2 Arrow batches
    blocks, stats = pack(many, block_size=7, remainder="drop", pad_id=0)
    flat = [t for block in blocks["input_ids"] for t in block]
    assert flat == list(range(len(flat))) and stats["dropped_tokens"] == 30_003 % 7


def test_pack_pads_the_remainder_outside_the_loss():
    blocks, stats = pack(token_lists([1, 2, 3], [4, 5]), block_size=4, remainder="pad", pad_id=EOS)
    assert blocks["input_ids"] == [[1, 2, 3, 4], [5, EOS, EOS, EOS]]
    assert blocks["labels"] == [[1, 2, 3, 4], [5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert stats["padding_tokens"] == 3 and stats["dropped_tokens"] == 0


def test_pack_exact_fit_has_no_remainder():
    blocks, stats = pack(token_lists([1, 2], [3, 4]), block_size=2, remainder="pad", pad_id=0)
    assert blocks["input_ids"] == [[1, 2], [3, 4]] and stats["padding_tokens"] == 0


def test_pad_mode_one_document_per_block_with_attention_mask():
    blocks, stats = pad(token_lists([1, 2], [3, 4, 5, 6, 7], [], [8]), block_size=4, pad_id=EOS)
    assert blocks["input_ids"] == [[1, 2, EOS, EOS], [3, 4, 5, 6], [8, EOS, EOS, EOS]]
    assert blocks["attention_mask"] == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert blocks["labels"] == [[1, 2, -100, -100], [3, 4, 5, 6], [8, -100, -100, -100]]
    assert stats["truncated_tokens"] == 1 and stats["padding_tokens"] == 2 + 3 and stats["blocks"] == 3


def test_split_off_validation_is_seeded_and_disjoint():
    raw = datasets.DatasetDict({"train": docs(*[f"doc {i}" for i in range(20)])})
    data = data_params(dataset="x", validation_split="validation")
    a = split_documents(raw, data, val_fraction=0.25, seed=1)
    b = split_documents(raw, data, val_fraction=0.25, seed=1)
    c = split_documents(raw, data, val_fraction=0.25, seed=2)
    assert a["validation"]["text"] == b["validation"]["text"] != c["validation"]["text"]
    assert len(a["validation"]) == 5 and not set(a["validation"]["text"]) & set(a["train"]["text"])


def test_the_datasets_own_validation_and_test_splits_are_used():
    raw = datasets.DatasetDict({"train": docs("a", "b"), "validation": docs("v"), "test": docs("t")})
    splits = split_documents(raw, data_params(dataset="x"), val_fraction=0.5, seed=0)
    assert {k: v["text"] for k, v in splits.items()} == {"train": ["a", "b"], "validation": ["v"], "test": ["t"]}


def test_unknown_text_column(tokenizer):
    raw = datasets.DatasetDict({"train": docs("a", "b")})
    with pytest.raises(PipelineError, match="data.text_column: field 'body' is not in the records; they have text"):
        build_blocks(raw, tokenizer, 1024, data_params(dataset="x", text_column="body"), prep_params(), 0)


def test_build_blocks_counts_and_checks(tokenizer):
    raw = datasets.DatasetDict({"train": docs(*["a few words of text here"] * 12)})
    cfg = prep_params(block_size=8, add_eos=True, val_fraction=0.25)
    processed, stats, histogram = build_blocks(raw, tokenizer, 64, data_params(dataset="x"), cfg, seed=0)
    assert set(processed) == {"train", "validation"}
    assert stats["train"]["documents"] == 9 and stats["validation"]["documents"] == 3
    per_doc = len(tokenizer("a few words of text here").input_ids) + 1
    assert stats["train"]["tokens"] == 9 * per_doc and stats["train"]["length_p50"] == per_doc
    assert stats["train"]["blocks"] * 8 + stats["train"]["dropped_tokens"] == stats["train"]["tokens"]
    assert {"split": "train", "bin": "16", "bin_index": 0, "documents": 9} in histogram
    with pytest.raises(PipelineError, match=r"block_size \(8\) exceeds the model's n_positions \(4\)"):
        build_blocks(raw, tokenizer, 4, data_params(dataset="x"), cfg, seed=0)
    with pytest.raises(PipelineError, match="fewer than one block"):
        build_blocks(raw, tokenizer, 4096, data_params(dataset="x"), prep_params(block_size=4096), seed=0)
    empty = datasets.DatasetDict({"train": docs("", "", "")})
    with pytest.raises(PipelineError, match="empty corpus: the train split has no text"):
        build_blocks(empty, tokenizer, 64, data_params(dataset="x"), prep_params(block_size=8), seed=0)
    with pytest.raises(PipelineError, match="empty corpus: no train documents left after cleaning"):
        build_blocks(empty, tokenizer, 64, data_params(dataset="x"), prep_params(block_size=8, min_chars=1), 0)


def test_long_documents_are_tokenized_in_pieces_to_the_same_tokens(tokenizer):
    """A document past PIECE_CHARS goes through the tokenizer a piece at a time (its memory is ~100x its
    input: a 50 MB one-line file took 6 GB), cut where GPT-2's pre-tokenizer starts a token anyway."""
    import random

    from pipeline.tasks.causal_lm.preprocess import pieces

    rng = random.Random(0)
    words = ["the", "river's", "  double", "x", "don't", "123", "4.5", "!!", "\n", "end.", "café", "日本", "  "]
    text = "".join(rng.choice(words) + rng.choice([" ", "  ", "", " \n"]) for _ in range(20_000))
    parts = list(pieces(text, 2000))
    assert len(parts) > 20 and "".join(parts) == text and max(map(len, parts)) <= 2000
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [t for p in parts for t in tokenizer(p, add_special_tokens=False)["input_ids"]] == whole
    assert list(pieces("x" * 5000, 1000)) == ["x" * 5000]  # no safe cut: kept whole, never cut mid-token


def test_the_same_inputs_write_the_same_bytes_so_dvc_records_the_same_hash(project, tmp_path):
    """download and preprocess run twice on the same inputs and params write byte-identical folders, state.json
    (datasets' fingerprint) included: DVC's hash of data/raw and data/processed, and with it the run-cache's
    match for train, does not change from run to run or machine to machine."""
    import filecmp
    import shutil
    from pathlib import Path

    from pipeline.download import main as download_main
    from pipeline.preprocess import main as preprocess_main
    from tests.conftest import in_process

    other = tmp_path / "again"
    shutil.copytree(project, other)
    for root in (project, other):
        for command in (download_main, preprocess_main):
            result = in_process(command, [], root)
            assert result.returncode == 0, result.stderr[-2000:]

    def differing(a: Path, b: Path) -> list[str]:
        cmp = filecmp.dircmp(a, b)
        found = [str(a / name) for name in cmp.diff_files + cmp.left_only + cmp.right_only]
        _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
        found += [str(a / name) for name in mismatch + errors]
        return sorted(set(found)) + [f for sub in cmp.common_dirs for f in differing(a / sub, b / sub)]

    for folder in ("data/raw", "data/processed"):
        assert differing(project / folder, other / folder) == [], folder
    state = (project / "data/processed/train/state.json").read_text()
    assert '"_fingerprint"' in state
