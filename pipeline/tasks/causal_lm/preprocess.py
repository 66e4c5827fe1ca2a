"""The preprocess stage for task: causal_lm: records into text (pipeline.data.records), cleaning,
tokenization, blocks.

Two block modes. pack (default): EOS after every document, the split concatenated once and cut into
block_size blocks. Unlike run_clm's group_texts, which drops up to block_size-1 tokens at the end of
every 1000-document map batch, each split loses at most one remainder, and `preprocess.remainder`
says what happens to it. pad: one document per block, truncated to block_size and padded, with an
attention mask. Blocks are written to disk as they are cut, so memory holds one map batch, not the
corpus. Prompt tokens of prompt/response records, and padding, get labels -100: out of the loss.

Blocks: `input_ids`, `labels` [, `attention_mask`]; stats per split: documents, tokens, blocks, tokens
lost to truncation and to the remainder, padding, documents dropped as short or duplicate, document
length percentiles.
"""

from __future__ import annotations

import logging
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.common import IGNORE_INDEX, digest
from pipeline.core.config import DataConfig, Params, PreprocessConfig
from pipeline.core.errors import PipelineError
from pipeline.data.lengths import check_block_size, histogram_rows, length_stats
from pipeline.data.records import check_columns, clean, drop_bad_records, renderer
from pipeline.data.splits import split_documents

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np
    from datasets import Dataset, DatasetDict, Features
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def blocks(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, params: Params, context: int | None, csv: bool
           ) -> tuple[DatasetDict, dict, list[dict]]:
    """The task's blocks, stats and length histogram (the stage's interface): packed or padded documents."""
    return build_blocks(raw, tokenizer, context, params.data, params.preprocess, params.seed, csv=csv)


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
    fast = getattr(backend, "encode_batch_fast", None)  # Rust, threaded, no character offsets: faster
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
        for text in texts:  # a long document a piece at a time: the tokenizer's memory is many times its input
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

    # An explicit fingerprint: otherwise datasets hashes `encode` by pickling the whole tokenizer, which was
    # most of the stage's time. The stage writes to a fresh directory and caching is off.
    fingerprint = digest([docs._fingerprint, add_eos, len(tokenizer), tokenizer.name_or_path])
    return docs.map(encode, batched=True, batch_size=batch_size, num_proc=num_proc if num_proc > 1 else None,
                    remove_columns=docs.column_names, desc="tokenize", new_fingerprint=fingerprint)


def _features(block_size: int, attention_mask: bool) -> Features:
    import datasets

    column = datasets.List(datasets.Value("int32"), length=block_size)
    names = ["input_ids", "labels"] + (["attention_mask"] if attention_mask else [])
    return datasets.Features(dict.fromkeys(names, column))


def _write_blocks(batches: Any, block_size: int, attention_mask: bool) -> Any:
    """A Dataset memory-mapped from an Arrow file written one batch of blocks at a time. Not
    Dataset.from_generator: it would take the blocks one row at a time through a builder, where these are
    whole numpy batches written as Arrow columns (measured: docs/speed.md, "Writing blocks")."""
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


def _source(data: DataConfig) -> str:
    if data.prompt_template:
        return "prompt_template + response_template"
    if data.template:
        return "data.template"
    if data.dialogue_column:
        return f"dialogue column {data.dialogue_column!r}"
    return f"column {data.text_column!r}"
