"""The report stage for task: causal_lm: perplexity before and after, how many times lower, the eval loss,
the training's speed, how much of the samples is copied."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.tasks.headline import rounded, speed, training_line


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


def summary_lines(workspace: Path, evaluation: dict, train: dict) -> tuple[list[str], str]:
    """The demo's closing lines: the base-vs-fine-tuned table, samples side by side; and where they are."""
    val = evaluation["validation"]
    gen = json.loads((workspace / "metrics/generate.json").read_text())
    samples = [json.loads(line) for line in (workspace / "outputs/samples.jsonl").read_text().splitlines()]
    rows = [("base (untrained tiny GPT-2)", val["base"]), ("fine-tuned", val["finetuned"])]
    header = f"validation: {val['tokens']:,} tokens"
    lines = [f"{header:<36}{'loss':>8}{'perplexity':>12}{'sliding':>10}{'bits/byte':>11}",
             *[f"{name:<36}{m['loss']:>8.3f}{m['perplexity']:>12,.1f}{m['sliding_perplexity']:>10,.1f}"
               f"{m['bits_per_byte']:>11.3f}" for name, m in rows],
             f"perplexity {val['perplexity_relative_reduction']:.1%} lower after fine-tuning "
             f"(sliding window: stride {evaluation['stride']} of {evaluation['block_size']})",
             training_line(train),
             f"samples: copied 8-grams {gen['finetuned']['copied_8gram_fraction']:.2f} (fine-tuned), "
             f"distinct-2 {gen['finetuned']['distinct_2']:.2f}", "", "samples (prompt | fine-tuned | base):"]
    by_model = {name: [s for s in samples if s["model"] == name] for name in ("finetuned", "base")}
    for tuned, base in list(zip(by_model["finetuned"], by_model["base"], strict=False))[:4]:
        lines.append(f"  {tuned['prompt']} | {tuned['text'][:60]!r} | {base['text'][:40]!r}")
    return lines, "outputs/samples.md (side by side)"
