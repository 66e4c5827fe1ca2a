"""Stage 4, evaluate: the fine-tuned model beside the base model on the same validation (and test)
data, in metrics/eval.json, with the plot rows of its task (pipeline.tasks.<task>.evaluate): a language
model's loss, perplexity (blocks and sliding window) and bits per byte, a classifier's accuracy, macro-F1
and confusion matrix beside its baselines.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.core.cli import params_option, stage_command
from pipeline.core.device import keep_freed_memory, resolve_precision
from pipeline.core.outputs import outputs, write_json
from pipeline.core.preamble import start_stage
from pipeline.tasks import task_part


@stage_command
@params_option
@click.option("--data", "data_dir", default="data/processed", show_default=True, type=click.Path(path_type=Path),
              help="Blocks from preprocess (validation, and test when present).")
@click.option("--base", "base_dir", default="models/base", show_default=True, type=click.Path(path_type=Path),
              help="Base model.")
@click.option("--model", "finetuned_dir", default="models/finetuned", show_default=True,
              type=click.Path(path_type=Path), help="Fine-tuned model.")
@click.option("--metrics", "metrics_path", default="metrics/eval.json", show_default=True,
              type=click.Path(path_type=Path), help="Where the metrics are written.")
@click.option("--plot", "plot_path", default="metrics/perplexity.json", show_default=True,
              type=click.Path(path_type=Path),
              help="Base vs fine-tuned perplexity rows for dvc plots (a language model's).")
@click.option("--confusion", "confusion_path", default="metrics/confusion.json", show_default=True,
              type=click.Path(path_type=Path),
              help="Validation labels and predictions for dvc plots (a classifier's).")
def main(params_path: str, data_dir: Path, base_dir: Path, finetuned_dir: Path, metrics_path: Path,
         plot_path: Path, confusion_path: Path) -> None:
    """Loss, perplexity (blocks and sliding window) and bits per byte of the base and the fine-tuned
    model on the same tokens, and the improvement; for a classifier, accuracy, macro-F1, the
    per-class figures and the confusion matrix beside the majority class and the base model zero-shot.
    Each task leaves the other's plot file empty."""
    params = start_stage("evaluate", params_path, gpus=1)
    keep_freed_memory()
    precision = resolve_precision(params.evaluate.precision, "evaluate.precision")
    results, plots = task_part(params.task, "evaluate").evaluate(params, base_dir, finetuned_dir, data_dir, precision)
    with outputs(metrics_path, plot_path, confusion_path) as (metrics_tmp, plot_tmp, confusion_tmp):
        write_json(metrics_tmp, results)
        write_json(plot_tmp, plots.get("perplexity", []))  # each task leaves the other's plot empty
        write_json(confusion_tmp, plots.get("confusion", []))


if __name__ == "__main__":
    main()
