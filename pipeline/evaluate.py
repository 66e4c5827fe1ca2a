"""Stage 4, evaluate: loss and perplexity of the base AND the fine-tuned model on the same
validation blocks, in one metrics file, with the improvement.

The loss is the mean negative log-likelihood over every predicted token (each block predicts
block_size - 1 tokens; labels -100 are skipped), summed across batches before dividing, so the
figure does not depend on the batch size.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import click

from pipeline.common import (
    IGNORE_INDEX,
    PipelineError,
    collate_blocks,
    device,
    keep_freed_memory,
    load_model,
    params_option,
    stage_command,
    write_json,
)
from pipeline.config import load_params

log = logging.getLogger("pipeline.evaluate")


def token_nll(model: Any, blocks: Any, batch_size: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and number of predicted tokens over `blocks`."""
    import torch
    import torch.nn.functional as F

    dev = device()
    model.to(dev).eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(blocks), batch_size):
            batch = collate_blocks(blocks.select(range(start, min(start + batch_size, len(blocks)))))
            logits = model(input_ids=batch["input_ids"].to(dev)).logits.float()
            targets = batch["labels"][:, 1:].to(dev)
            total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    return total, count


def summarize(nll: float, tokens: int) -> dict[str, float]:
    loss = nll / tokens
    return {"loss": loss, "perplexity": math.exp(loss)}


def compare(base: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    """How much fine-tuning changed perplexity: positive reduction means it helped."""
    return {"perplexity_reduction": base["perplexity"] - finetuned["perplexity"],
            "perplexity_ratio": finetuned["perplexity"] / base["perplexity"],
            "loss_reduction": base["loss"] - finetuned["loss"]}


def evaluate(base_dir: Path, finetuned_dir: Path, data_dir: Path, batch_size: int, trust_remote_code: bool) -> dict:
    import datasets

    if not (data_dir / "dataset_dict.json").exists():
        raise PipelineError(f"{data_dir} is not a processed dataset; run preprocess first (dvc repro preprocess)")
    blocks = datasets.load_from_disk(str(data_dir))["validation"]
    results: dict[str, Any] = {}
    for name, path in (("base", base_dir), ("finetuned", finetuned_dir)):
        nll, tokens = token_nll(load_model(path, trust_remote_code), blocks, batch_size)
        results[name] = summarize(nll, tokens)
        log.info("%s: loss %.4f, perplexity %.2f over %d tokens", name, results[name]["loss"],
                 results[name]["perplexity"], tokens)
    results["tokens"] = tokens
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
    write_json(metrics_path, evaluate(base_dir, finetuned_dir, data_dir, params.evaluate.batch_size,
                                      params.model.trust_remote_code))


if __name__ == "__main__":
    main()
