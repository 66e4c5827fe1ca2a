"""The report stage for task: classification: macro-F1 and accuracy beside the baselines fine-tuning must
beat, the eval loss, the training's speed."""

from __future__ import annotations

from pipeline.tasks.headline import rounded, speed


def headline(train: dict, evaluation: dict, generation: dict) -> dict:
    """The summary row (the stage's interface)."""
    validation = evaluation["validation"]
    return {
        "macro_f1": round(validation["finetuned"]["macro_f1"], 4),
        "accuracy": round(validation["finetuned"]["accuracy"], 4),
        "f1_majority": round(validation["majority"]["macro_f1"], 4),  # the baselines fine-tuning must beat
        "f1_zero_shot": round(validation["zero_shot"]["macro_f1"], 4),
        "eval_loss": rounded(train.get("eval_loss"), 4),
        **speed(train),
    }
