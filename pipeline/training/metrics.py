"""What the train stage reports of a run (metrics/train.json and its last log line): losses over the whole
run (a resumed one included), steady and whole-run throughput, the training's peak memory beside its
estimate."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.training.checkpoints import checkpoint_step
from pipeline.training.plan import Plan
from pipeline.training.throughput import ThroughputMeter

if TYPE_CHECKING:
    from transformers import Trainer
    from transformers.trainer_utils import TrainOutput


def run_metrics(trainer: Trainer, result: TrainOutput, seconds: float, start_step: int, meter: ThroughputMeter,
                plan: Plan) -> dict:
    """metrics/train.json: losses, steady and whole-run throughput: tokens/s of the whole run (every process),
    MFU per device."""
    args = trainer.args
    # whole run: the evaluations inside train() (step 0, every eval_steps) are taken out; a resumed run's
    # history also holds the earlier run's, up to and including its resume step
    history = trainer.state.log_history  # the final evaluate() below appends to it too
    eval_seconds = sum(h["eval_runtime"] for h in history
                       if "eval_runtime" in h and (h["step"] > start_step or not start_step))
    # with eval_steps the Trainer has evaluated the last step itself; without, evaluate once here
    final_eval = trainer.evaluate() if args.eval_strategy == "no" else {}
    final = final_eval or saved_model_evaluation(trainer)
    step = trainer.state.global_step
    trained = step - start_step  # 0 when a run stopped after its last checkpoint is run again
    tokens_per_second = trained * plan.tokens_per_step / (seconds - eval_seconds) if trained else None
    return {
        "train_loss": whole_run_loss(history, start_step, result.training_loss, trained),
        "final_train_loss": last_logged(history, "loss"),
        "eval_loss": final.get("eval_loss"),
        **{key: final[key] for key in ("eval_accuracy", "eval_macro_f1") if key in final},  # classification
        "base_eval_loss": next((h["eval_loss"] for h in history if h.get("step") == 0 and "eval_loss" in h), None),
        "steps": step, "epochs": trainer.state.epoch, "tokens_seen": step * plan.tokens_per_step,
        "effective_batch_size": plan.effective_batch, "effective_batch_tokens": plan.tokens_per_step,
        **meter.steady(),
        "tokens_per_second": tokens_per_second, "mfu": meter.mfu(tokens_per_second) if tokens_per_second else None,
        "wall_seconds": seconds, "eval_seconds": eval_seconds,
        "flops_per_token": meter.flops_per_token, "device_peak_flops": meter.peak_flops,
        "resumed_from_step": start_step or None, "best_checkpoint": trainer.state.best_model_checkpoint,
    }


def saved_model_evaluation(trainer: Trainer) -> dict:
    """The last evaluation of the model that is saved: with load_best_model_at_end the best checkpoint's
    (the Trainer kept its step), else the last one logged."""
    evaluations = [h for h in trainer.state.log_history if "eval_loss" in h]
    best = trainer.state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    if best:
        step = checkpoint_step(best)
        evaluations = [h for h in evaluations if h["step"] == step] or evaluations
    return evaluations[-1] if evaluations else {}


def whole_run_loss(history: list[dict], start_step: int, session_loss: float, trained: int) -> float | None:
    """The mean training loss of the whole run: for a resumed run, the loss logged before its checkpoint
    (each interval weighted by its steps) with this session's. The Trainer's own figure covers only the
    steps of its session (none at all when nothing was left to train)."""
    logged = [(h["step"], h["loss"]) for h in history if "loss" in h and h["step"] <= start_step]
    steps = [step for step, _ in logged]
    earlier = sum(loss * (step - previous) for (step, loss), previous in zip(logged, [0, *steps], strict=False))
    covered = steps[-1] if steps else 0
    if not covered + trained:
        return None
    return (earlier + session_loss * trained) / (covered + trained)


def last_logged(history: list[dict], key: str) -> float | None:
    return next((entry[key] for entry in reversed(history) if key in entry), None)


def summary_line(m: dict) -> str:
    """The stage's last log line: losses, steady and whole-run throughput, memory against its estimate."""
    def rate(tokens: float | None, mfu: float | None) -> str:
        return f"{tokens:,.0f} tokens/s (MFU {100 * mfu:.1f}%)" if tokens and mfu is not None else "n/a"

    def loss(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "n/a"

    memory = (f"peak memory {m['peak_memory_gib']:.2f} GiB ({m['peak_memory_kind']}; "
              f"estimate {m['memory_estimate_gib']:.2f})")
    return (f"train loss {loss(m['train_loss'])}, eval loss {loss(m['eval_loss'])}, {m['steps']} steps; steady "
            f"{rate(m['steady_tokens_per_second'], m['steady_mfu'])} after {m['warmup_steps']} warm-up steps, "
            f"whole run {rate(m['tokens_per_second'], m['mfu'])}; {memory}")
