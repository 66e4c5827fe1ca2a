"""Stage 2, preprocess: tokenize, put EOS between documents, concatenate, cut into blocks, split.

Unlike run_clm's group_texts, which drops up to block_size-1 tokens at the end of every 1000-document
map batch, the whole split is concatenated once, so each split loses at most one remainder, and
`preprocess.remainder` says what happens to it. Output: data/processed/ (a DatasetDict of
`input_ids` and `labels` blocks: train, validation and test when the raw data has it) and a stats file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from pipeline.common import (
    IGNORE_INDEX,
    PipelineError,
    atomic_dir,
    digest,
    load_tokenizer,
    params_option,
    stage_command,
    write_json,
)
from pipeline.config import DataConfig, PreprocessConfig, load_params

log = logging.getLogger("pipeline.preprocess")


def split_documents(raw: Any, data: DataConfig, val_fraction: float, seed: int) -> dict[str, Any]:
    """train / validation (/ test) document splits: the dataset's own validation split when it has one,
    else a seeded `val_fraction` of the training documents."""
    train = raw[data.train_split]
    if data.text_column not in train.column_names:
        raise PipelineError(f"data.text_column: {data.text_column!r} is not a column of the dataset; it has "
                            f"{', '.join(train.column_names)}")
    if data.validation_split and data.validation_split in raw:
        splits = {"train": train, "validation": raw[data.validation_split]}
    else:
        if train.num_rows < 2:
            raise PipelineError(f"the dataset has {train.num_rows} document(s) and no validation split, so none can "
                                "be split off; add documents, set data.txt_sample_by: paragraph, or provide a "
                                "validation split")
        parts = train.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
        splits = {"train": parts["train"], "validation": parts["test"]}
    if "test" in raw and data.train_split != "test":
        splits["test"] = raw["test"]
    return splits


def tokenize(docs: Any, tokenizer: Any, text_column: str, add_eos: bool, num_proc: int, batch_size: int) -> Any:
    """A dataset with one `input_ids` list per document, EOS appended to every non-empty one."""
    eos = [tokenizer.eos_token_id] if add_eos else []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)  # Rust, threaded, no character offsets: ~1.5x __call__

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [t if isinstance(t, str) else "" for t in batch[text_column]]
        if fast is not None:
            ids = [e.ids for e in fast(texts, add_special_tokens=False)]
        else:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [x + eos if x else x for x in ids]}

    # An explicit fingerprint: otherwise datasets hashes `encode` by pickling the whole tokenizer, which took
    # 70% of the stage on a 1M-token corpus. The stage writes to a fresh directory and caching is off.
    fingerprint = digest([docs._fingerprint, text_column, add_eos, len(tokenizer), tokenizer.name_or_path])
    return docs.map(encode, batched=True, batch_size=batch_size, num_proc=num_proc if num_proc > 1 else None,
                    remove_columns=docs.column_names, desc="tokenize", new_fingerprint=fingerprint)


def chunk(token_lists: Any, block_size: int, remainder: str, pad_id: int) -> tuple[Any, dict]:
    """Concatenate every document's tokens and cut them into block_size blocks.

    Returns the blocks (`input_ids`, `labels`) and counts. `remainder: drop` discards the last
    partial block; `pad` keeps it, padded with `pad_id`, its padding labelled IGNORE_INDEX.
    """
    import datasets
    import numpy as np
    import pyarrow as pa

    column = token_lists.data.column("input_ids")
    flat = np.concatenate([c.flatten().to_numpy(zero_copy_only=False) for c in column.chunks] or [np.zeros(0)])
    ids = flat.astype(np.int32)
    n_full, rest = divmod(len(ids), block_size)
    blocks = ids[: n_full * block_size].reshape(n_full, block_size)
    labels = blocks.copy()
    padded = 0
    if rest and remainder == "pad":
        padded = block_size - rest
        tail = np.concatenate([ids[n_full * block_size:], np.full(padded, pad_id, np.int32)])
        tail_labels = np.concatenate([ids[n_full * block_size:], np.full(padded, IGNORE_INDEX, np.int32)])
        blocks, labels = np.vstack([blocks, tail]), np.vstack([labels, tail_labels])
    table = pa.table({
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(blocks.reshape(-1), pa.int32()), block_size),
        "labels": pa.FixedSizeListArray.from_arrays(pa.array(labels.reshape(-1), pa.int32()), block_size),
    })
    features = datasets.Features({"input_ids": datasets.List(datasets.Value("int32"), length=block_size),
                                  "labels": datasets.List(datasets.Value("int32"), length=block_size)})
    stats = {"documents": token_lists.num_rows, "tokens": int(len(ids)), "blocks": int(len(blocks)),
             "dropped_tokens": int(rest) if remainder == "drop" else 0, "padding_tokens": int(padded)}
    return datasets.Dataset(table).cast(features), stats


def model_max_positions(model_dir: Path) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def build_blocks(raw: Any, tokenizer: Any, max_positions: int | None, data: DataConfig, cfg: PreprocessConfig,
                 seed: int) -> tuple[Any, dict]:
    """The processed DatasetDict and per-split stats."""
    import datasets

    if max_positions is not None and cfg.block_size > max_positions:
        raise PipelineError(f"params: preprocess.block_size ({cfg.block_size}) exceeds the model's n_positions "
                            f"({max_positions}); set block_size to at most {max_positions}")
    tokenizer.model_max_length = int(1e30)  # documents are long on purpose; blocks are cut below
    processed, stats = {}, {}
    for name, docs in split_documents(raw, data, cfg.val_fraction, seed).items():
        tokens = tokenize(docs, tokenizer, data.text_column, cfg.add_eos, cfg.num_proc, cfg.batch_size)
        processed[name], stats[name] = chunk(tokens, cfg.block_size, cfg.remainder, tokenizer.pad_token_id)
        if stats[name]["tokens"] == 0:
            raise PipelineError(f"empty corpus: the {name} split has no text in column {data.text_column!r}; "
                                "check data.dataset and data.text_column")
        if stats[name]["blocks"] == 0:
            raise PipelineError(f"the {name} split has {stats[name]['tokens']} tokens, fewer than one block of "
                                f"{cfg.block_size}; lower preprocess.block_size, set remainder: pad, or add text")
        log.info("%s: %s", name, stats[name])
    return datasets.DatasetDict(processed), {"block_size": cfg.block_size, "add_eos": cfg.add_eos,
                                             "remainder": cfg.remainder, **stats}


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
def main(params_path: str, raw_dir: Path, model_dir: Path, out: Path, stats_path: Path) -> None:
    """Tokenize, add EOS between documents, chunk into blocks, and split train/validation."""
    import datasets

    params = load_params(params_path)
    datasets.disable_caching()  # map() would otherwise write cache files into data/raw, another stage's output
    if not (raw_dir / "dataset_dict.json").exists():
        raise PipelineError(f"{raw_dir} is not a saved dataset; run the download stage first (dvc repro download)")
    tokenizer = load_tokenizer(model_dir, params.model.trust_remote_code)
    processed, stats = build_blocks(datasets.load_from_disk(str(raw_dir)), tokenizer, model_max_positions(model_dir),
                                    params.data, params.preprocess, params.seed)
    with atomic_dir(out) as tmp:
        processed.save_to_disk(str(tmp))
    write_json(stats_path, stats)


if __name__ == "__main__":
    main()
