"""The generate stage's counterpart for task: classification: the label of each text of generate.prompts
(and generate.prompts_file), with every label's probability, from the fine-tuned classifier (and, with
generate.compare_base, the base model's zero-shot answer beside it); written to outputs/predictions.jsonl
and predictions.md. Ad hoc (`python -m pipeline.generate --model DIR --text ...`) it prints them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pipeline.core.config import Params
from pipeline.core.loading import MADE_BY, check_folder, context_length, load_model, load_tokenizer
from pipeline.core.outputs import outputs, write_json, write_text
from pipeline.generation.prompts import load_prompts
from pipeline.tasks.classification.preprocess import blocks_of
from pipeline.tasks.classification.scoring import probabilities, zero_shot

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def classify(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int = 32
             ) -> list[dict]:
    """One record per text: its label and every label's probability, texts cut and padded as preprocess
    made the blocks the classifier learnt from (text_shape)."""
    import datasets

    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    shape = text_shape(model, tokenizer)
    tokenizer.model_max_length = int(1e30)  # texts are cut to the block size by blocks_of, not by the tokenizer
    encoded = blocks_of(texts, tokenizer, shape["block_size"], shape["add_eos"], shape["padding_side"])
    encoded.pop("length")
    rows = probabilities(model, datasets.Dataset.from_dict(encoded), batch_size, "fp32")
    return [{"text": text, "label": names[int(p.argmax())], "probabilities": {n: round(float(q), 6)
                                                                              for n, q in zip(names, p, strict=True)}}
            for text, p in zip(texts, rows, strict=True)]


def text_shape(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """How the classifier's texts are read, from its tokenizer's settings (train.read_as_blocks): the block
    size (model_max_length, at most the model's context), whether EOS ends a text (the post-processor adds
    it), the padding side. A model trained before the tokenizer kept them has them in its config."""
    legacy = getattr(model.config, "text_blocks", None)
    if legacy:
        return legacy
    context = context_length(model.config) or 1024
    eos = tokenizer.eos_token_id
    with_special, plain = (tokenizer("a", add_special_tokens=flag)["input_ids"] for flag in (True, False))
    return {"block_size": min(tokenizer.model_max_length, context),
            "add_eos": eos is not None and with_special == [*plain, eos], "padding_side": tokenizer.padding_side}


def predict(params: Params, texts: list[str], finetuned_dir: Path, base_dir: Path) -> tuple[list[dict], dict]:
    """The predictions (with the base model's zero-shot label where generate.compare_base) and metrics."""
    from collections import Counter

    trust = params.model.trust_remote_code
    for name, path in (("finetuned", finetuned_dir), *((("base", base_dir),) if params.generate.compare_base else ())):
        check_folder(path, MADE_BY[name])
    model = load_model(finetuned_dir, trust, made_by="train", task="classification")
    records = classify(model, load_tokenizer(finetuned_dir, trust, "train"), texts)
    metrics = {"finetuned": {"texts": len(records), "labels": dict(Counter(r["label"] for r in records)),
                             "mean_confidence": sum(max(r["probabilities"].values()) for r in records)
                             / max(1, len(records))}}
    if params.generate.compare_base:
        names = list(records[0]["probabilities"]) if records else []
        base, tokenizer = load_model(base_dir, trust, made_by="download"), load_tokenizer(base_dir, trust, "download")
        guessed = zero_shot(base, tokenizer, texts, names, params.classify.zero_shot_prompt,
                            context_length(base.config), params.generate.batch_size, "fp32")
        for record, label in zip(records, guessed, strict=True):
            record["base_zero_shot"] = names[int(label)]
        metrics["base"] = {"texts": len(records), "labels": dict(Counter(r["base_zero_shot"] for r in records)),
                           "agreement_with_finetuned": sum(r["label"] == r["base_zero_shot"] for r in records)
                           / max(1, len(records))}
    return records, metrics


def generate(params: Params, model_dir: Path, base_dir: Path, data_dir: Path, out: Path, metrics_path: Path) -> None:
    """The labels of generate.prompts (and prompts_file), written to `out` and `metrics_path` (the stage's
    interface; `data_dir` is a language model's, for its copying check)."""
    records, metrics = predict(params, load_prompts(params.generate), model_dir, base_dir)
    write_predictions(records, metrics, out, metrics_path)


def table(records: list[dict]) -> str:
    """outputs/predictions.md: one row per text."""
    base = any("base_zero_shot" in r for r in records)
    lines = ["| text | label | probability | next | " + ("base zero-shot |" if base else ""),
             "|---|---|---|---|" + ("---|" if base else "")]
    for r in records:
        ranked = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])
        text = r["text"].replace("|", "\\|").replace("\n", " ")
        second = f"{ranked[1][0]} ({ranked[1][1]:.2f})" if len(ranked) > 1 else ""
        lines.append(f"| {text} | **{ranked[0][0]}** | {ranked[0][1]:.3f} | {second} | "
                     + (f"{r.get('base_zero_shot', '')} |" if base else ""))
    return "\n".join(lines) + "\n"


def write_predictions(records: list[dict], metrics: dict, out: Path, metrics_path: Path) -> None:
    with outputs(out, metrics_path) as (out_tmp, metrics_tmp):
        write_text(out_tmp / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        write_text(out_tmp / "predictions.md", table(records))
        write_json(metrics_tmp, metrics)


def print_predictions(model_dir: Path, texts: list[str], trust: bool) -> None:
    """Ad hoc: the label and the probabilities of each text, printed; nothing is written."""
    model = load_model(model_dir, trust, task="classification")
    for r in classify(model, load_tokenizer(model_dir, trust), texts):
        ranked = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["probabilities"].items(), key=lambda kv: -kv[1]))
        click.echo(f"{r['label']}\t{ranked}\t{r['text']}")
