"""Stage 2, preprocess: the downloaded records into the blocks the model trains on, split train /
validation (/ test). The task makes the blocks (pipeline.tasks.<task>.preprocess): a language model's
packed or padded documents, a classifier's padded texts with their label ids.

Output: data/processed/ (a DatasetDict per split, and provenance.json: what the blocks are made of),
metrics/data.json (per split: documents, tokens, blocks, what was dropped and why, length percentiles)
and metrics/doc_lengths.json (the length histogram plot).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from pipeline.core.cli import check_processes, params_option, stage_command
from pipeline.core.config import Params
from pipeline.core.loading import context_length, load_config, load_saved_dataset, load_tokenizer, read_json
from pipeline.core.outputs import outputs, save_dataset, write_json
from pipeline.core.preamble import start_stage
from pipeline.tasks import task_part

RECORD_KEYS = ("train_split", "validation_split", "text_column", "template", "dialogue_column", "speakers",
               "use_chat_template", "prompt_template", "response_template")


def data_provenance(source: dict, params: Params, labels: list[str] | None) -> dict:
    """What the blocks are made of: the raw data's provenance (data/raw/provenance.json), how records
    became text, and the preprocessing; where the task has labels, their names in id order. The later
    stages (and the train stage's model card) read it from here."""
    task = {"task": params.task, **({"labels": labels, "classify": asdict(params.classify)} if labels else {})}
    return {"source": source, "records": {key: getattr(params.data, key) for key in RECORD_KEYS},
            "preprocess": asdict(params.preprocess), **task}


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

    params = start_stage("preprocess", params_path)
    check_processes("preprocess.num_proc", params.preprocess.num_proc)
    datasets.disable_caching()  # map() would otherwise write cache files into data/raw, another stage's output
    raw = load_saved_dataset(raw_dir, "download")
    provenance = read_json(raw_dir / "provenance.json", "download")
    tokenizer = load_tokenizer(model_dir, params.model.trust_remote_code, "download")
    context = context_length(load_config(model_dir, made_by="download"))
    csv = provenance.get("format") == "csv"
    task = task_part(params.task, "preprocess")
    processed, stats, histogram = task.blocks(raw, tokenizer, params, context, csv)
    labels = stats.get("labels")
    with outputs(out, stats_path, lengths_path) as (out_tmp, stats_tmp, lengths_tmp):
        save_dataset(processed, out_tmp, data_provenance(provenance, params, labels), params.seed)
        write_json(stats_tmp, stats)
        write_json(lengths_tmp, histogram)


if __name__ == "__main__":
    main()
