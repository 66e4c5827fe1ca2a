"""Stage 4, evaluate: loss and perplexity of the base AND the fine-tuned model on the same
validation blocks, in one metrics file, with the improvement.

The loss is the mean negative log-likelihood over every predicted token (each block predicts
block_size - 1 tokens; labels -100 are skipped), summed across batches before dividing, so the
figure does not depend on the batch size. It runs without gradients, under autocast in
`evaluate.precision` (auto: bf16 where the device does it natively), with GPT-2's output layer and
cross-entropy taken chunk by chunk (pipeline.throughput.next_token_loss).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import click

from pipeline.common import (
    PipelineError,
    collate_blocks,
    device,
    keep_freed_memory,
    load_model,
    params_option,
    resolve_precision,
    stage_command,
    write_json,
)
from pipeline.config import load_params
from pipeline.throughput import next_token_loss

log = logging.getLogger("pipeline.evaluate")


def token_nll(model: Any, blocks: Any, batch_size: int, precision: str = "fp32") -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and number of predicted tokens over `blocks`, without
    gradients, under autocast in `precision` (the loss itself is always accumulated in fp32)."""
    import torch

    dev = device()
    model.to(dev).eval()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    total, count = 0.0, 0
    with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        for start in range(0, len(blocks), batch_size):
            batch = collate_blocks(blocks.select(range(start, min(start + batch_size, len(blocks)))))
            nll, n, _ = next_token_loss(model, model, batch["input_ids"].to(dev), batch["labels"].to(dev),
                                        model.config.vocab_size)
            total += nll.item()
            count += int(n)
    return total, count


def summarize(nll: float, tokens: int) -> dict[str, float]:
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(loss)}


def compare(base: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    """How much fine-tuning changed perplexity: positive reduction means it helped."""
    return {"perplexity_reduction": base["perplexity"] - finetuned["perplexity"],
            "perplexity_ratio": finetuned["perplexity"] / base["perplexity"],
            "loss_reduction": base["loss"] - finetuned["loss"]}


def evaluate(base_dir: Path, finetuned_dir: Path, data_dir: Path, batch_size: int, trust_remote_code: bool,
             precision: str = "fp32") -> dict:
    import datasets

    if not (data_dir / "dataset_dict.json").exists():
        raise PipelineError(f"{data_dir} is not a processed dataset; run preprocess first (dvc repro preprocess)")
    blocks = datasets.load_from_disk(str(data_dir))["validation"]
    results: dict[str, Any] = {}
    for name, path in (("base", base_dir), ("finetuned", finetuned_dir)):
        nll, tokens = token_nll(load_model(path, trust_remote_code), blocks, batch_size, precision)
        results[name] = summarize(nll, tokens)
        log.info("%s: loss %.4f, perplexity %.2f over %d tokens", name, results[name]["loss"],
                 results[name]["perplexity"], tokens)
    results["tokens"] = tokens
    results["precision"] = precision
    results.update(compare(results["base"], results["finetuned"]))
    if results["perplexity_reduction"] < 0:
        log.warning("fine-tuning made validation perplexity worse (%.2f -> %.2f); try a lower lr or fewer epochs",
                    results["base"]["perplexity"], results["finetuned"]["perplexity"])
    return results


@stage_command
@params_option
@click.option("--data", "data_dir", default="data/processed", show_default=True, type=click.Path(path_type=Path),
              help="Blocks from preprocess (the validation split is used).")
@click.option("--base", "base_dir", default="models/base", show_default=True, type=click.Path(path_type=Path),
              help="Base model.")
@click.option("--model", "finetuned_dir", default="models/finetuned", show_default=True,
              type=click.Path(path_type=Path), help="Fine-tuned model.")
@click.option("--metrics", "metrics_path", default="metrics/eval.json", show_default=True,
              type=click.Path(path_type=Path), help="Where the metrics are written.")
def main(params_path: str, data_dir: Path, base_dir: Path, finetuned_dir: Path, metrics_path: Path) -> None:
    """Validation loss and perplexity of the base and the fine-tuned model, and the improvement."""
    params = load_params(params_path)
    keep_freed_memory()
    precision = resolve_precision(params.evaluate.precision, "evaluate.precision")
    write_json(metrics_path, evaluate(base_dir, finetuned_dir, data_dir, params.evaluate.batch_size,
                                      params.model.trust_remote_code, precision))


if __name__ == "__main__":
    main()
