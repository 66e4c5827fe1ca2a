"""The report stage for task: causal_lm: perplexity before and after, how many times lower, the eval loss,
the training's speed, how much of the samples is copied."""

from __future__ import annotations

from pipeline.tasks.headline import rounded, speed


def headline(train: dict, evaluation: dict, generation: dict) -> dict:
    """The summary row (the stage's interface)."""
    validation, run = evaluation["validation"], speed(train)
    base, tuned = validation["base"]["perplexity"], validation["finetuned"]["perplexity"]
    return {
        "ppl": round(tuned, 2),
        "ppl_base": round(base, 2),
        "ppl_gain": round(base / tuned, 2),  # how many times lower fine-tuning made perplexity
        "eval_loss": round(validation["finetuned"]["loss"], 4),
        **{k: run[k] for k in ("tokens_s", "mfu", "peak_gib")},
        "copied": rounded(generation["finetuned"]["copied_8gram_fraction"], 3),
        "train_min": run["train_min"],
    }
