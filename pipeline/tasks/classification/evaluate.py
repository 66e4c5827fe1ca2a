"""The evaluate stage for task: classification: on validation (and test where the data has it), the
fine-tuned classifier beside the majority class and the base model zero-shot, each with accuracy,
macro-F1, per-class precision/recall/F1 and the confusion matrix; and the rows of the confusion plot
(one per validation text: its label and the fine-tuned model's)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from pipeline.core.config import Params
from pipeline.core.errors import PipelineError
from pipeline.core.loading import (
    MADE_BY,
    check_folder,
    context_length,
    load_model,
    load_saved_dataset,
    load_tokenizer,
    read_json,
    saved_labels,
)
from pipeline.tasks.classification.metrics import scores
from pipeline.tasks.classification.scoring import probabilities, texts_of, zero_shot

log = logging.getLogger(__name__)
BASELINES = ("majority", "zero_shot")


def evaluate(params: Params, base_dir: Path, finetuned_dir: Path, data_dir: Path, precision: str
             ) -> tuple[dict, dict[str, list[dict]]]:
    """metrics/eval.json and the confusion plot's rows (the stage's interface)."""
    import numpy as np

    for name, path in (("base", base_dir), ("finetuned", finetuned_dir)):  # both, before minutes on the first
        check_folder(path, MADE_BY[name])
    processed = load_saved_dataset(data_dir, "preprocess")
    names = saved_labels(read_json(data_dir / "provenance.json", "preprocess"), data_dir)
    trust, batch = params.model.trust_remote_code, params.evaluate.batch_size
    counts = Counter(processed["train"]["labels"])
    majority = max(range(len(names)), key=lambda i: (counts.get(i, 0), -i))
    classifier = load_model(finetuned_dir, trust, made_by="train", task="classification")
    trained_on = [classifier.config.id2label[i] for i in range(classifier.config.num_labels)]
    if trained_on != names:
        raise PipelineError(f"{finetuned_dir} was trained on the labels {trained_on[:6]}, and {data_dir} has "
                            f"{names[:6]}; re-run the train stage (dvc repro train)")
    base, base_tokenizer = load_model(base_dir, trust, made_by="download"), load_tokenizer(base_dir, trust, "download")
    results: dict = {"task": "classification", "labels": names, "precision": precision,
                     "majority_class": names[majority]}
    rows = []
    for split in [s for s in ("validation", "test") if s in processed]:
        blocks = processed[split]
        actual = np.asarray(blocks["labels"])
        predicted = probabilities(classifier, blocks, batch, precision).argmax(1)
        guessed = zero_shot(base, base_tokenizer, texts_of(blocks, base_tokenizer), names,
                            params.classify.zero_shot_prompt, context_length(base.config), batch, precision)
        results[split] = {"finetuned": scores(actual, predicted, names),
                          "majority": scores(actual, np.full(len(actual), majority), names),
                          "zero_shot": scores(actual, guessed, names)}
        for baseline in BASELINES:
            results[split][f"macro_f1_gain_over_{baseline}"] = (results[split]["finetuned"]["macro_f1"]
                                                                - results[split][baseline]["macro_f1"])
        log.info("%s: accuracy %.3f, macro-F1 %.3f (majority class %.3f, base zero-shot %.3f) over %d texts", split,
                 results[split]["finetuned"]["accuracy"], results[split]["finetuned"]["macro_f1"],
                 results[split]["majority"]["macro_f1"], results[split]["zero_shot"]["macro_f1"], len(actual))
        if split == "validation":
            rows = [{"actual": names[a], "predicted": names[p]} for a, p in zip(actual, predicted, strict=True)]
    return results, {"confusion": rows}
