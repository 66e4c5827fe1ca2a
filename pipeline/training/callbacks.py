"""The train stage's TrainerCallbacks: dvclive plots at the Trainer's step, a progress line per logging
interval, samples while training, a stop on a non-finite loss, early stopping. (The throughput meter's
is in pipeline.training.throughput, the checkpoint marker's in pipeline.training.checkpoints.)"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.cli import is_main_process
from pipeline.core.common import perplexity
from pipeline.core.errors import PipelineError
from pipeline.core.outputs import write_text
from pipeline.training.checkpoints import mark_complete_callback
from pipeline.training.throughput import ThroughputMeter, meter_callback

if TYPE_CHECKING:
    from collections.abc import Iterable

    from transformers import (
        PreTrainedModel,
        PreTrainedTokenizerBase,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )

    from pipeline.core.config import SamplesConfig, TrainConfig

log = logging.getLogger(__name__)
NOT_PLOTTED = {"epoch", "train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second",
               "total_flos", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def live_callback(live_dir: Path, resume: bool) -> TrainerCallback:
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    class StepCallback(DVCLiveCallback):
        """Logs at the Trainer's global step: train and eval rows share the x axis."""

        def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    logs: dict | None = None, **kwargs: Any) -> None:
            # "loss" is the per-step training loss: plot it as train/loss beside eval/loss; the end-of-run
            # summary (mean train_loss, runtimes) goes to metrics/train.json instead of the plots
            logs = {("train_loss" if k == "loss" else k): v for k, v in (logs or {}).items() if k not in NOT_PLOTTED}
            if not logs:
                return
            if self.live is not None:
                self.live.step = state.global_step
            super().on_log(args, state, control, logs=logs, **kwargs)

    live = Live(str(live_dir), resume=resume, dvcyaml=False, save_dvc_exp=False) if is_main_process() else None
    return StepCallback(live=live)


def leave_classifier_curves_empty(live_dir: Path) -> None:
    """A language model's live log gets the classifier's accuracy and macro-F1 curves as headers alone:
    dvc.yaml declares those plots for both tasks, and DVC skips an empty one where a missing one is an
    error ("failed to load some plots")."""
    for name in ("accuracy", "macro_f1"):
        path = live_dir / "plots/metrics/eval" / f"{name}.tsv"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text(path, f"step\t{name}\n")


def progress_callback(tokens_per_step: int) -> TrainerCallback:
    """One log line per logging interval: step/total, loss, learning rate, tokens/s, elapsed and ETA
    (from the interval's speed); one per evaluation. Replaces the Trainer's printed dicts."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        started = 0.0

        def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                            **kwargs: Any) -> None:
            self.started = time.perf_counter()

        def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    logs: dict | None = None, **kwargs: Any) -> None:
            logs, step, total = logs or {}, state.global_step, state.max_steps
            if "eval_loss" in logs:
                figures = (f"accuracy {logs['eval_accuracy']:.3f}, macro-F1 {logs['eval_macro_f1']:.3f}"
                           if "eval_accuracy" in logs else f"perplexity {perplexity(logs['eval_loss']):,.1f}")
                log.info("step %d/%d: eval loss %.4f (%s), %.1f s", step, total, logs["eval_loss"], figures,
                         logs.get("eval_runtime", 0.0))
            if "loss" not in logs:
                return
            rate = logs.get("perf/tokens_per_second")
            eta = (total - step) * tokens_per_step / rate if rate else None
            log.info("step %d/%d (%.0f%%) | loss %.4f | lr %.3g | %s | %s elapsed, ETA %s", step, total,
                     100 * step / max(total, 1), logs["loss"], logs.get("learning_rate", float("nan")),
                     f"{rate:,.0f} tokens/s" if rate else "- tokens/s",
                     hours_minutes_seconds(time.perf_counter() - self.started),
                     hours_minutes_seconds(eta) if eta is not None else "-")

    return Progress()


def hours_minutes_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def samples_callback(cfg: SamplesConfig, tokenizer: PreTrainedTokenizerBase, live_dir: Path, meter: ThroughputMeter,
                     resume: bool) -> list[TrainerCallback]:
    """Every `cfg.every` steps, continue cfg.prompts with the model being trained and append the samples
    to live_dir/samples.md. Every rank samples (ZeRO-3 needs them all in each forward), rank 0 writes. The
    RNG states are put back afterwards (training is the same with or without samples) and the time is
    taken out of the throughput."""
    if not cfg.every:
        return []
    from transformers import TrainerCallback

    path = live_dir / "samples.md"
    if not resume and is_main_process():
        path.unlink(missing_ok=True)

    class Samples(TrainerCallback):
        def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                        model: PreTrainedModel | None = None, **kwargs: Any) -> None:
            if state.global_step % cfg.every:
                return
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the step's work is training time, not sampling time
            started = time.perf_counter()
            # every rank samples: under ZeRO-3 each forward gathers the weights from all of them (generate
            # turns on synced_gpus), and under DDP the others would wait for rank 0 anyway; rank 0 writes
            texts = sample_texts(getattr(model, "_orig_mod", model), tokenizer, cfg)
            meter.exclude(time.perf_counter() - started)
            if not state.is_world_process_zero:
                return
            lines = [f"## step {state.global_step}", ""] + [f"- {p!r} → {t!r}" for p, t in zip(cfg.prompts, texts,
                                                                                             strict=True)]
            with path.open("a") as f:
                f.write("\n".join(lines) + "\n\n")

    return [Samples()]


def sample_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: SamplesConfig) -> list[str]:
    """One sampled continuation per prompt (top-k 50, temperature 0.8), the RNG states left as they were."""
    import torch

    from pipeline.core.loading import context_length

    states = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training
    model.eval()
    try:
        texts = []
        for prompt in cfg.prompts:
            ids = tokenizer(prompt or tokenizer.eos_token, return_tensors="pt").to(next(model.parameters()).device)
            width = ids["input_ids"].shape[1]
            left_in_context = (context_length(model.config) or cfg.max_new_tokens + width) - width
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=min(left_in_context, cfg.max_new_tokens), do_sample=True,
                                     top_k=50, temperature=0.8, pad_token_id=tokenizer.pad_token_id)
            texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        return texts
    finally:
        model.train(was_training)
        torch.set_rng_state(states[0])
        if states[1] is not None:
            torch.cuda.set_rng_state_all(states[1])


def stop_on_non_finite() -> TrainerCallback:
    """Stop at the first logged non-finite training loss. Checked at logging steps, where the Trainer
    copies the loss to the host anyway, not every step (a per-step check would stall the GPU): a logged
    loss is the mean of its interval, so a NaN at any step shows; the steps after the last interval
    show in the run's train_loss, and the weights are checked before they are saved (finite_weights)."""
    from transformers import TrainerCallback

    class StopOnNonFinite(TrainerCallback):
        def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                   logs: dict | None = None, **kwargs: Any) -> None:
            for key in ("loss", "train_loss"):  # an interval's mean, and the whole run's after the last interval
                loss = (logs or {}).get(key)
                if loss is not None and not math.isfinite(loss):
                    raise PipelineError(f"the training loss became {loss} by step {state.global_step}; lower lr (now "
                                        "too high for this model), raise warmup_steps, use train.precision: fp32, "
                                        "or check the data (a split of empty responses trains on nothing)")

    return StopOnNonFinite()


def finite_weights(named: Iterable[tuple[str, Any]]) -> None:
    """Refuse to save a model with NaN or infinite weights, naming the first such tensor (`named`: a
    model's named_parameters(), or a sharded run's gathered weights' items())."""
    import torch

    bad = next((name for name, p in named if not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise PipelineError(f"training left non-finite weights ({bad}); nothing was saved: lower lr, raise "
                            "warmup_steps or max_grad_norm's strictness, use train.precision: fp32, or check the base "
                            "model (download) and the data")


def early_stopping(patience: int) -> list:
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=patience)] if patience else []


def training_callbacks(t: TrainConfig, tokenizer: PreTrainedTokenizerBase, live_dir: Path, meter: ThroughputMeter,
                       tokens_per_step: int, resume: bool) -> list[TrainerCallback]:
    """The train stage's callbacks, in the order they run: the throughput meter, the stop on a non-finite
    loss, the progress line, the live log, the checkpoint marker, the samples, early stopping."""
    return [meter_callback(meter), stop_on_non_finite(), progress_callback(tokens_per_step),
            live_callback(live_dir, resume), mark_complete_callback(),
            *samples_callback(t.samples, tokenizer, live_dir, meter, resume),
            *early_stopping(t.early_stopping_patience)]
