"""The report stage for task: classification: macro-F1 and accuracy beside the baselines fine-tuning must
beat, the eval loss, the training's speed."""

from __future__ import annotations

from pathlib import Path

from pipeline.tasks.headline import rounded, speed, training_line


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


def summary_lines(workspace: Path, evaluation: dict, train: dict) -> tuple[list[str], str]:
    """The demo's closing lines: the classifier's validation figures beside the majority class and the base
    model zero-shot; and where the predictions are."""
    val = evaluation["validation"]
    rows = [("fine-tuned", val["finetuned"]), (f"majority class ({evaluation['majority_class']})", val["majority"]),
            ("base zero-shot (untrained tiny GPT-2)", val["zero_shot"])]
    lines = [f"{'validation: ' + format(val['finetuned']['examples'], ',') + ' texts':<40}{'accuracy':>10}"
             f"{'macro-F1':>10}",
             *[f"{name:<40}{m['accuracy']:>10.3f}{m['macro_f1']:>10.3f}" for name, m in rows],
             f"labels: {', '.join(evaluation['labels'])}", training_line(train)]
    return lines, "outputs/predictions.md, the confusion matrix in dvc plots"
