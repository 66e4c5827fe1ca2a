"""Stage 2, preprocess: records into text (pipeline.data.records), cleaning, tokenization, blocks, split.

Two block modes. pack (default): EOS after every document, the split concatenated once and cut into
block_size blocks. Unlike run_clm's group_texts, which drops up to block_size-1 tokens at the end of
every 1000-document map batch, each split loses at most one remainder, and `preprocess.remainder`
says what happens to it. pad: one document per block, truncated to block_size and padded, with an
attention mask. Blocks are written to disk as they are cut, so memory holds one map batch, not the
corpus. Prompt tokens of prompt/response records, and padding, get labels -100: out of the loss.

Output: data/processed/ (a DatasetDict of `input_ids`, `labels` [, `attention_mask`] blocks: train,
validation, and test when the raw data has it), metrics/data.json (per split: documents, tokens,
blocks, tokens lost to truncation and to the remainder, padding, documents dropped as short or
duplicate, document length percentiles) and metrics/doc_lengths.json (the length histogram plot).
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.classification.data import classification_blocks
from pipeline.core.common import IGNORE_INDEX, PipelineError, check_processes, digest, params_option, stage_command
from pipeline.core.config import DataConfig, Params, PreprocessConfig
from pipeline.core.loading import context_length, load_config, load_saved_dataset, load_tokenizer, read_json
from pipeline.core.outputs import hold_workspace, outputs, write_json
from pipeline.core.params import load_params
from pipeline.data.lengths import histogram_rows, length_stats
from pipeline.data.records import check_columns, clean, drop_bad_records, renderer

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np
    from datasets import Dataset, DatasetDict, Features
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__spec__.name)  # under python -m, __name__ is "__main__"


def split_documents(raw: DatasetDict, data: DataConfig, val_fraction: float, seed: int) -> dict[str, Dataset]:
    """train / validation (/ test) document splits: the dataset's own validation split when it has one,
    else a seeded `val_fraction` of the training documents."""
    train = raw[data.train_split]
    if data.validation_split and data.validation_split in raw:
        splits = {"train": train, "validation": raw[data.validation_split]}
    else:
        if train.num_rows < 2:
            raise PipelineError(f"the dataset has {train.num_rows} document(s) and no validation split, so none can "
                                "be split off; add documents, set data.txt_sample_by: paragraph, or provide a "
                                "validation split")
        held_out = math.ceil(train.num_rows * val_fraction)  # as train_test_split rounds a fraction
        if held_out >= train.num_rows:
            raise PipelineError(f"params: preprocess.val_fraction ({val_fraction:g}) of {train.num_rows} documents "
                                f"holds out {held_out}, leaving none to train on; lower it (at most "
                                f"{(train.num_rows - 1) / train.num_rows:.2f} here) or add documents")
        parts = train.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
        splits = {"train": parts["train"], "validation": parts["test"]}
    if "test" in raw and data.train_split != "test":
        splits["test"] = raw["test"]
    return splits


def render(docs: Dataset, data: DataConfig, cfg: PreprocessConfig, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Records to `text` (and `prompt`) columns."""
    fingerprint = digest([docs._fingerprint, repr(data), repr(cfg)])
    return docs.map(renderer(data, cfg, tokenizer), batched=True, batch_size=cfg.batch_size,
                    num_proc=cfg.num_proc if cfg.num_proc > 1 else None, remove_columns=docs.column_names,
                    desc="records to text", new_fingerprint=fingerprint)


PIECE_CHARS = 1 << 20  # documents longer than this are tokenized in pieces of about this size
_CUT = re.compile(r"(?<=\S) (?=\S)")  # one space between two non-spaces: GPT-2's pre-tokenizer starts a token there


def pieces(text: str, size: int) -> Iterator[str]:
    """`text` in consecutive pieces of at most about `size` characters, each cut before a single space
    between two non-space characters: a boundary byte-level BPE (GPT-2's pre-tokenizer) never merges
    across, so the pieces' tokens, joined, are the whole text's. A stretch with no such space is kept
    whole rather than cut where the tokens would change."""
    start = 0
    while len(text) - start > size:
        cut = _CUT.search(text, start + size // 2, start + size) or _CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def tokenize(docs: Dataset, tokenizer: PreTrainedTokenizerBase, add_eos: bool, num_proc: int, batch_size: int
             ) -> Dataset:
    """One `input_ids` list per document, EOS appended to every non-empty one; with a `prompt` column,
    also `labels`: -100 over the prompt's tokens."""
    eos = [tokenizer.eos_token_id] if add_eos else []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)  # Rust, threaded, no character offsets: ~1.5x __call__
    if backend is not None and (backend.padding or backend.truncation):
        # set to pad or cut (a tokenizer.json may say so; a call with padding=True leaves it so), the backend
        # would pad every document to the batch's longest: transformers' own call turns both off first
        fast = None
    sft = "prompt" in docs.column_names

    def encoded(texts: list[str]) -> list[list[int]]:
        if fast is not None:
            return [e.ids for e in fast(texts, add_special_tokens=False)]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    def ids_of(texts: list[str]) -> list[list[int]]:
        if max(map(len, texts), default=0) <= PIECE_CHARS:
            return encoded(texts)
        out = []
        for text in texts:  # a long document a piece at a time: the tokenizer's memory is ~100x its input
            ids: list[int] = []
            for piece in pieces(text, PIECE_CHARS):
                ids += encoded([piece])[0]
            out.append(ids)
        return out

    def encode(batch: dict[str, list]) -> dict[str, list]:
        if not sft:
            return {"input_ids": [x + eos if x else x for x in ids_of(batch["text"])]}
        # prompt and response tokenized apart, so the boundary between them is exact
        prompts = ids_of(batch["prompt"])
        responses = ids_of([t[len(p):] for t, p in zip(batch["text"], batch["prompt"], strict=True)])
        ids = [p + r + eos for p, r in zip(prompts, responses, strict=True)]
        labels = [[IGNORE_INDEX] * len(p) + r + eos for p, r in zip(prompts, responses, strict=True)]
        return {"input_ids": ids, "labels": labels}

    # An explicit fingerprint: otherwise datasets hashes `encode` by pickling the whole tokenizer, which took
    # 70% of the stage on a 1M-token corpus. The stage writes to a fresh directory and caching is off.
    fingerprint = digest([docs._fingerprint, add_eos, len(tokenizer), tokenizer.name_or_path])
    return docs.map(encode, batched=True, batch_size=batch_size, num_proc=num_proc if num_proc > 1 else None,
                    remove_columns=docs.column_names, desc="tokenize", new_fingerprint=fingerprint)


def _features(block_size: int, attention_mask: bool) -> Features:
    import datasets

    column = datasets.List(datasets.Value("int32"), length=block_size)
    names = ["input_ids", "labels"] + (["attention_mask"] if attention_mask else [])
    return datasets.Features(dict.fromkeys(names, column))


def _write_blocks(batches: Any, block_size: int, attention_mask: bool) -> Any:
    """A Dataset memory-mapped from an Arrow file written one batch of blocks at a time."""
    import datasets
    import pyarrow as pa
    from datasets.fingerprint import get_temporary_cache_files_directory

    features = _features(block_size, attention_mask)
    path = Path(get_temporary_cache_files_directory()) / f"blocks-{uuid.uuid4().hex}.arrow"  # removed at exit
    schema = features.arrow_schema
    def column(values: Any) -> Any:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.int32()), block_size)

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for arrays in batches:
            if len(arrays[0]):
                columns = {name: column(a) for name, a in zip(schema.names, arrays, strict=True)}
                writer.write_table(pa.table(columns, schema=schema))
    return datasets.Dataset.from_file(str(path))


def _documents(tokens: Dataset) -> Iterator[np.ndarray]:
    """(input_ids, labels) per map batch of documents, as flat numpy arrays plus lengths."""
    import numpy as np
    import pyarrow.compute as pc

    for batch in tokens.data.table.to_batches(max_chunksize=10_000):
        ids_column = batch.column("input_ids")
        ids = ids_column.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
        labels = (batch.column("labels").flatten().to_numpy(zero_copy_only=False).astype(np.int32)
                  if "labels" in batch.schema.names else ids)
        yield ids, labels, pc.list_value_length(ids_column).to_numpy(zero_copy_only=False)


def pack(tokens: Dataset, block_size: int, remainder: str, pad_id: int) -> tuple[Dataset, dict]:
    """Concatenate every document's tokens and cut them into block_size blocks (carrying the tail of
    each map batch over to the next). `remainder: drop` discards the last partial block; `pad` keeps
    it, padded with `pad_id`, its padding labelled IGNORE_INDEX."""
    import numpy as np

    stats = {"tokens": 0, "dropped_tokens": 0, "padding_tokens": 0, "truncated_tokens": 0}

    def blocks() -> Any:
        carry_ids, carry_labels = np.zeros(0, np.int32), np.zeros(0, np.int32)
        for ids, labels, _ in _documents(tokens):
            stats["tokens"] += len(ids)
            carry_ids, carry_labels = np.concatenate([carry_ids, ids]), np.concatenate([carry_labels, labels])
            full = len(carry_ids) // block_size * block_size
            yield carry_ids[:full].reshape(-1, block_size), carry_labels[:full].reshape(-1, block_size)
            carry_ids, carry_labels = carry_ids[full:], carry_labels[full:]
        if len(carry_ids) and remainder == "pad":
            stats["padding_tokens"] = block_size - len(carry_ids)
            padding = np.full(stats["padding_tokens"], pad_id, np.int32)
            yield (np.concatenate([carry_ids, padding])[None],
                   np.concatenate([carry_labels, np.full_like(padding, IGNORE_INDEX)])[None])
        else:
            stats["dropped_tokens"] = len(carry_ids)

    dataset = _write_blocks(blocks(), block_size, attention_mask=False)
    return dataset, {"documents": tokens.num_rows, **stats, "blocks": len(dataset)}


def pad(tokens: Dataset, block_size: int, pad_id: int) -> tuple[Dataset, dict]:
    """One block per document: truncated to block_size, padded with `pad_id`; the padding is out of
    the loss (labels -100) and of the attention mask. Empty documents make no block."""
    import numpy as np

    stats = {"tokens": 0, "dropped_tokens": 0, "padding_tokens": 0, "truncated_tokens": 0}

    def blocks() -> Any:
        for ids, labels, lengths in _documents(tokens):
            stats["tokens"] += len(ids)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            kept = lengths > 0
            n = int(kept.sum())
            out_ids = np.full((n, block_size), pad_id, np.int32)
            out_labels = np.full((n, block_size), IGNORE_INDEX, np.int32)
            mask = np.zeros((n, block_size), np.int32)
            for row, (start, length) in enumerate(zip(starts[kept], lengths[kept], strict=True)):
                used = min(int(length), block_size)
                out_ids[row, :used] = ids[start:start + used]
                out_labels[row, :used] = labels[start:start + used]
                mask[row, :used] = 1
                stats["truncated_tokens"] += int(length) - used
                stats["padding_tokens"] += block_size - used
            yield out_ids, out_labels, mask

    dataset = _write_blocks(blocks(), block_size, attention_mask=True)
    return dataset, {"documents": tokens.num_rows, **stats, "blocks": len(dataset)}


def length_summary(tokens: Dataset) -> tuple[dict, list[int]]:
    """Document length percentiles (tokens) and histogram counts over HISTOGRAM_EDGES."""
    import numpy as np

    return length_stats(np.concatenate([n for _, _, n in _documents(tokens)] or [np.zeros(0, np.int64)]))


def check_block_size(block_size: int, max_positions: int | None) -> None:
    if max_positions is not None and block_size > max_positions:
        raise PipelineError(f"params: preprocess.block_size ({block_size}) exceeds the model's n_positions "
                            f"({max_positions}); set block_size to at most {max_positions}")


def check_responses(tokens: Dataset, split: str, add_eos: bool) -> None:
    """Prompt/response data trains on the responses alone: a split whose responses are all empty has no
    token to learn from (the loss would be 0/0, NaN)."""
    import numpy as np

    labels = tokens.data.column("labels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    scored = int(np.count_nonzero(labels != IGNORE_INDEX)) - (len(tokens) if add_eos else 0)  # EOS aside
    if scored <= 0:
        raise PipelineError(f"every response of the {split} split is empty, so there is nothing to train on or "
                            "score; check data.response_template and the field it names")


def build_blocks(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, max_positions: int | None, data: DataConfig,
                 cfg: PreprocessConfig, seed: int, csv: bool = False) -> tuple[DatasetDict, dict, list[dict]]:
    """The processed DatasetDict, per-split stats, and the document-length histogram rows."""
    import datasets

    check_block_size(cfg.block_size, max_positions)
    if data.train_split not in raw:
        raise PipelineError(f"params: data.train_split {data.train_split!r} is not a split of the downloaded data "
                            f"({', '.join(raw)}); set it to one of them")
    check_columns(raw[data.train_split].column_names, data, csv)
    tokenizer.model_max_length = int(1e30)  # documents are long on purpose; blocks are cut below
    processed, stats, histogram, train_hashes = {}, {}, [], None
    for name, docs in split_documents(raw, data, cfg.val_fraction, seed).items():
        docs, bad = drop_bad_records(render(docs, data, cfg, tokenizer), name, cfg.bad_records)
        docs, counts, hashes = clean(docs, cfg, train_hashes)
        counts = bad | counts
        if name == "train":
            train_hashes = hashes
        if len(docs) == 0:
            raise PipelineError(f"empty corpus: no {name} documents left after cleaning ({counts}); check "
                                "data.dataset and the preprocess.min_chars / dedup settings")
        tokens = tokenize(docs, tokenizer, cfg.add_eos, cfg.num_proc, cfg.batch_size)
        if "labels" in tokens.column_names:
            check_responses(tokens, name, cfg.add_eos)
        if cfg.mode == "pack":
            processed[name], stats[name] = pack(tokens, cfg.block_size, cfg.remainder, tokenizer.pad_token_id)
        else:
            processed[name], stats[name] = pad(tokens, cfg.block_size, tokenizer.pad_token_id)
        lengths, counts_by_length = length_summary(tokens)
        stats[name].update(counts | lengths)
        histogram += histogram_rows(name, counts_by_length)
        if stats[name]["tokens"] == 0:
            raise PipelineError(f"empty corpus: the {name} split has no text ({_source(data)}); check data.dataset "
                                "and the column or template that makes the text")
        if stats[name]["blocks"] == 0:
            raise PipelineError(f"the {name} split has {stats[name]['tokens']} tokens, fewer than one block of "
                                f"{cfg.block_size}; lower preprocess.block_size, set remainder: pad, or add text")
        log.info("%s: %s", name, stats[name])
    summary = {"block_size": cfg.block_size, "mode": cfg.mode, "add_eos": cfg.add_eos, "remainder": cfg.remainder}
    return datasets.DatasetDict(processed), {**summary, **stats}, histogram


RECORD_KEYS = ("train_split", "validation_split", "text_column", "template", "dialogue_column", "speakers",
               "use_chat_template", "prompt_template", "response_template")


def data_provenance(source: dict, params: Params, labels: list[str] | None) -> dict:
    """What the blocks are made of: the raw data's provenance (data/raw/provenance.json), how records
    became text, and the preprocessing; for classification the label names in id order. The later
    stages (and the train stage's model card) read it from here."""
    task = {"task": params.task, **({"labels": labels, "classify": asdict(params.classify)} if labels else {})}
    return {"source": source, "records": {key: getattr(params.data, key) for key in RECORD_KEYS},
            "preprocess": asdict(params.preprocess), **task}


def _source(data: DataConfig) -> str:
    if data.prompt_template:
        return "prompt_template + response_template"
    if data.template:
        return "data.template"
    if data.dialogue_column:
        return f"dialogue column {data.dialogue_column!r}"
    return f"column {data.text_column!r}"


@stage_command
@params_option
@click.option("--raw", "raw_dir", default="data/raw", show_default=True, type=click.Path(path_type=Path),
              help="Raw dataset from download.")
@click.option("--model", "model_dir", default="models/base", show_default=True, type=click.Path(path_type=Path),
              help="Base model directory (its tokenizer and n_positions are used).")
@click.option("--out", default="data/processed", show_default=True, type=click.Path(path_type=Path),
              help="Where the blocks are saved.")
@click.option("--stats", "stats_path", default="metrics/data.json", show_default=True,
              type=click.Path(path_type=Path), help="Per-split counts (documents, tokens, blocks, dropped).")
@click.option("--lengths", "lengths_path", default="metrics/doc_lengths.json", show_default=True,
              type=click.Path(path_type=Path), help="Document length histogram (dvc plots).")
def main(params_path: str, raw_dir: Path, model_dir: Path, out: Path, stats_path: Path, lengths_path: Path) -> None:
    """Records to text, clean, tokenize, and cut into blocks (pack or pad); split train/validation."""
    import datasets

    params = load_params(params_path)
    hold_workspace("python -m pipeline.preprocess")  # one run per workspace
    check_processes("preprocess.num_proc", params.preprocess.num_proc)
    datasets.disable_caching()  # map() would otherwise write cache files into data/raw, another stage's output
    raw = load_saved_dataset(raw_dir, "download")
    provenance = read_json(raw_dir / "provenance.json", "download")
    tokenizer = load_tokenizer(model_dir, params.model.trust_remote_code, "download")
    context = context_length(load_config(model_dir, made_by="download"))
    csv = provenance.get("format") == "csv"
    if params.task == "classification":
        check_block_size(params.preprocess.block_size, context)
        processed, stats, histogram = classification_blocks(raw, tokenizer, params, csv)
    else:
        processed, stats, histogram = build_blocks(raw, tokenizer, context, params.data, params.preprocess,
                                                   params.seed, csv=csv)
    labels = stats.get("labels")
    with outputs(out, stats_path, lengths_path) as (out_tmp, stats_tmp, lengths_tmp):
        processed.save_to_disk(str(out_tmp))
        write_json(out_tmp / "provenance.json", data_provenance(provenance, params, labels))
        write_json(stats_tmp, stats)
        write_json(lengths_tmp, histogram)


if __name__ == "__main__":
    main()
