"""How well labels were predicted: accuracy, macro-F1, each class's precision, recall, F1 and support,
and the confusion matrix; the same figures for the Trainer's evaluations (compute_metrics), for the
evaluate stage and for its baselines."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from transformers import EvalPrediction


def scores(actual: np.ndarray, predicted: np.ndarray, names: list[str]) -> dict:
    """Accuracy, macro-F1 (over every class; a class never predicted and never present counts 0), and per
    class precision, recall, F1 and support, and the confusion matrix (rows: actual, columns: predicted)."""
    import numpy as np

    n = len(names)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (actual, predicted), 1)
    hits = np.diag(confusion).astype(float)
    support, guessed = confusion.sum(1), confusion.sum(0)
    precision = np.divide(hits, guessed, out=np.zeros(n), where=guessed > 0)
    recall = np.divide(hits, support, out=np.zeros(n), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(n), where=precision + recall > 0)
    return {"accuracy": float(hits.sum() / max(1, len(actual))), "macro_f1": float(f1.mean()),
            "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                                 "support": int(support[i])} for i, name in enumerate(names)},
            "confusion": confusion.tolist(), "examples": int(len(actual))}


def trainer_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """compute_metrics for the Trainer: accuracy and macro-F1 of the argmax over the logits."""
    import numpy as np

    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    labels = np.asarray(prediction.label_ids)
    n = logits.shape[-1]
    result = scores(labels, logits.argmax(-1), [str(i) for i in range(n)])
    return {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"]}


def class_weights(counts: list[int]) -> list[float]:
    """classify.class_weights: balanced, each class weighed n / (classes x its count); 0 for a class with
    no training example (it cannot be in a batch)."""
    total, classes = sum(counts), len(counts)
    return [total / (classes * c) if c else 0.0 for c in counts]
