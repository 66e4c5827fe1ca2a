"""Stage 3, train: fine-tune models/base on data/processed with the Hugging Face Trainer.

setup (precision, model with padding/freezing/LoRA, attention measured, memory preflight)
-> run (Trainer, resuming an interrupted run) -> save (merged, unpadded, safetensors) and metrics.

Multi-GPU (torchrun, see NPROC_PER_NODE) and mixed precision come from the Trainer. Metrics and
per-step plots go through dvclive (dvcyaml=False: dvc.yaml declares them). Checkpoints go to
`checkpoints/`, a `persist: true` out: an interrupted `dvc repro` resumes from the last complete one,
but only when it was made by the same params, data and base model (a fingerprint guards it), so a
new experiment never continues an old one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from pipeline.card import git_commit, lock_hashes, model_card
from pipeline.common import (
    PipelineError,
    atomic_dir,
    collate_blocks,
    digest,
    is_main_process,
    keep_freed_memory,
    load_model,
    load_tokenizer,
    params_option,
    remove,
    resolve_precision,
    stage_command,
    write_json,
    write_text,
)
from pipeline.config import Params, TrainConfig, load_params
from pipeline.throughput import (
    check_attention,
    estimate_memory,
    fastest_attention,
    flops_per_token,
    next_token_loss,
    pad_vocab,
    peak_flops,
    peak_memory_used,
    preflight,
)

log = logging.getLogger("pipeline.train")
FINGERPRINT = "fingerprint.json"
COMPLETE = "checkpoint-complete.json"  # written once the Trainer has finished a checkpoint
NOT_PLOTTED = {"epoch", "train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second",
               "total_flos", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


# --- setup ---------------------------------------------------------------------------------------

def training_arguments(params: Params, precision: str, checkpoints: Path) -> Any:
    """TrainingArguments from params: the one place train.* meets the Trainer's names."""
    import torch
    from transformers import TrainingArguments

    t = params.train
    return TrainingArguments(
        output_dir=str(checkpoints), seed=params.seed, data_seed=params.seed, learning_rate=params.lr,
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        optim=t.optimizer, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm, bf16=precision == "bf16", fp16=precision == "fp16",
        gradient_checkpointing=t.gradient_checkpointing, torch_compile=t.torch_compile,
        logging_steps=t.logging_steps, logging_first_step=True, logging_nan_inf_filter=False,
        eval_strategy="steps" if t.eval_steps else "no", eval_steps=t.eval_steps or None,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        load_best_model_at_end=t.load_best_model_at_end, metric_for_best_model="eval_loss", greater_is_better=False,
        dataloader_num_workers=t.dataloader_num_workers, dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(), report_to="none", disable_tqdm=True,
    )


def freeze(model: Any, embeddings: bool, layers: int) -> None:
    """Keep the embeddings and/or the first `layers` transformer blocks fixed."""
    blocks = _blocks(model)
    if layers > len(blocks):
        raise PipelineError(f"params: train.freeze.layers ({layers}) exceeds the model's {len(blocks)} blocks")
    frozen = [*blocks[:layers], *([model.get_input_embeddings(), *_position_embeddings(model)] if embeddings else [])]
    for module in frozen:
        module.requires_grad_(False)


def _blocks(model: Any) -> list:
    base = getattr(model, model.base_model_prefix, model)
    for name in ("h", "layers", "blocks"):  # GPT-2, Llama-style, others
        if hasattr(base, name):
            return list(getattr(base, name))
    raise PipelineError(f"train.freeze.layers: cannot find the transformer blocks of {type(model).__name__}")


def _position_embeddings(model: Any) -> list:
    base = getattr(model, model.base_model_prefix, model)
    return [base.wpe] if hasattr(base, "wpe") else []


def add_lora(model: Any, cfg: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    try:
        return get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                target_modules=list(cfg.target_modules), task_type="CAUSAL_LM"))
    except ValueError as e:
        raise PipelineError(f"params: train.lora.target_modules {cfg.target_modules} do not fit this model "
                            f"({str(e).splitlines()[0]}); name its linear layers") from None


def without_adapters(model: Any) -> Any:
    """The transformers model inside a peft wrapper (the model itself without LoRA)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prepare_model(model: Any, t: TrainConfig) -> tuple[Any, int]:
    """The model as it will train (padded, partly frozen or with adapters) and its real vocabulary."""
    vocab = pad_vocab(model, t.pad_vocab_multiple_of)
    freeze(model, t.freeze.embeddings, t.freeze.layers)
    if t.lora.enabled:
        model = add_lora(model, t.lora)
    if t.gradient_checkpointing:
        model.config.use_cache = False
    base = without_adapters(model)
    if base.loss_type is None:
        # transformers 5 derives loss_type from the class name, and "GPT2LMHeadModel" names none; the Trainer
        # then counts position 0 of every block as a target (num_items_in_batch) and reports train and eval
        # losses scaled by (T-1)/T. Every model trained here is a causal LM.
        base.loss_type = "ForCausalLM"
    return model, vocab


def count_parameters(model: Any, vocab: int) -> tuple[int, int]:
    """Total and trainable parameters, not counting vocabulary padding rows."""
    params = list(model.parameters())
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    embeddings = model.get_input_embeddings().weight
    padding = (embeddings.shape[0] - vocab) * embeddings.shape[1]
    return total - padding, trainable - (padding if embeddings.requires_grad else 0)


def choose_attention(model: Any, requested: str, blocks: Any, batch_size: int, precision: str,
                     resumed: str | None) -> dict:
    """Set the attention implementation. `auto` measures the candidates on a real batch, except when
    resuming: a resumed run keeps the implementation it started with (the same numerics)."""
    check_attention(requested)
    if requested != "auto" or resumed:
        model.set_attn_implementation(resumed or requested)
        return {"attention": resumed or requested}
    sample = collate_blocks([blocks[i] for i in range(min(batch_size, len(blocks)))])
    device = next(model.parameters()).device
    best, timings = agree_across_ranks(fastest_attention(model, {k: v.to(device) for k, v in sample.items()},
                                                         precision))
    model.set_attn_implementation(best)
    log.info("attention: %s (measured forward+backward: %s)", best,
             ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in timings.items()))
    return {"attention": best, "attention_timings_ms": {k: round(v * 1000, 1) for k, v in timings.items()}}


def agree_across_ranks(value: Any) -> Any:
    """Rank 0's value on every rank (measured choices must not differ between DDP processes)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- checkpoints ---------------------------------------------------------------------------------

def fingerprint(params: Params, data_dir: Path, base_dir: Path) -> str:
    """What a checkpoint must match to be resumed: training params and the exact inputs."""
    inputs = {p.relative_to(data_dir).as_posix(): p.read_text() for p in sorted(data_dir.glob("*/state.json"))}
    for name in ("config.json", "provenance.json"):
        if (base_dir / name).exists():
            inputs[name] = (base_dir / name).read_text()
    return digest({"train": asdict(params.train), "lr": params.lr, "seed": params.seed, "inputs": inputs})


def resume_checkpoint(checkpoints: Path, run_id: str) -> str | None:
    """The newest complete checkpoint of an interrupted run with the same fingerprint, if any.
    Checkpoints without the completion marker (a run killed while saving) are skipped with a warning."""
    marker = checkpoints / FINGERPRINT
    if not checkpoints.is_dir() or not marker.exists():
        return None
    if json.loads(marker.read_text()).get("fingerprint") != run_id:
        log.info("checkpoints in %s come from other params or inputs; starting fresh", checkpoints)
        return None
    found = sorted((p for p in checkpoints.glob("checkpoint-*") if p.is_dir()), key=_checkpoint_step, reverse=True)
    for path in found:
        if (path / COMPLETE).exists():
            return str(path)
        log.warning("skipping %s: incomplete (the run stopped while writing it)", path)
    return None


def start_fresh(checkpoints: Path, run_id: str, attention: str) -> None:
    remove(checkpoints)
    write_json(checkpoints / FINGERPRINT, {"fingerprint": run_id, "attention": attention})


def started_with(checkpoints: Path) -> dict:
    return json.loads((checkpoints / FINGERPRINT).read_text())


def _checkpoint_step(checkpoint: str | Path | None) -> int:
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0


# --- the Trainer, its loss and its callbacks -----------------------------------------------------

def make_trainer(model: Any, args: Any, blocks: Any, tokenizer: Any, vocab: int, loss_chunk: int,
                 callbacks: list) -> Any:
    from transformers import Trainer

    class PipelineTrainer(Trainer):
        """The Trainer with next_token_loss (for GPT-2: no B x T x V logits in memory, padded vocabulary rows
        ignored) and a stop on a non-finite loss."""

        def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            total, count, outputs = next_token_loss(model, self.accelerator.unwrap_model(model), inputs["input_ids"],
                                                    inputs["labels"], vocab, loss_chunk, inputs.get("attention_mask"))
            if num_items_in_batch is not None:  # normalised over the whole accumulated (global) batch
                loss = total / num_items_in_batch
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes
                self.loss_is_scaled_for_ga = True
            else:
                loss = total / count.clamp(min=1)
                self.loss_is_scaled_for_ga = False
            check_finite(loss, self.state.global_step + 1)
            return (loss, outputs) if return_outputs else loss

    return PipelineTrainer(model=model, args=args, train_dataset=blocks["train"], eval_dataset=blocks["validation"],
                           data_collator=collate_blocks, processing_class=tokenizer, callbacks=callbacks)


def check_finite(loss: Any, step: int) -> None:
    import torch

    if not torch.isfinite(loss.detach()).all():
        raise PipelineError(f"the training loss became {loss.item()} at step {step}; lower lr (now too high for "
                            "this model), raise warmup_steps, or use train.precision: fp32")


def callbacks(live_dir: Path, resume: bool, tokens_per_step: int, flops: float, peak: float) -> list:
    from dvclive import Live
    from transformers import TrainerCallback
    from transformers.integrations import DVCLiveCallback

    class StepCallback(DVCLiveCallback):
        """Logs at the Trainer's global step, adding training throughput over each logging interval."""
        last: tuple[int, float] | None = None  # (step, training seconds) at the last training-loss log
        eval_seconds = 0.0  # evaluation inside training: not training time

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            self.eval_seconds += (logs or {}).get("eval_runtime", 0.0)
            # "loss" is the per-step training loss: plot it as train/loss beside eval/loss; the end-of-run
            # summary (mean train_loss, runtimes) goes to metrics/train.json instead of the plots
            logs = {("train_loss" if k == "loss" else k): v for k, v in (logs or {}).items() if k not in NOT_PLOTTED}
            now = (state.global_step, time.perf_counter() - self.eval_seconds)
            if "train_loss" in logs and self.last and now[0] > self.last[0]:
                tokens_per_second = (now[0] - self.last[0]) * tokens_per_step / (now[1] - self.last[1])
                logs.update({"perf/tokens_per_second": tokens_per_second, "perf/mfu": tokens_per_second * flops / peak})
            if "train_loss" in logs:
                self.last = now
            if not logs:
                return
            if self.live is not None:
                self.live.step = state.global_step  # train and eval rows line up on the same x axis
            super().on_log(args, state, control, logs=logs, **kwargs)

    class MarkComplete(TrainerCallback):
        """A checkpoint counts for resuming only once this marker follows all its files."""

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    write_json(folder / COMPLETE, {"step": state.global_step})

    live = Live(str(live_dir), resume=resume, dvcyaml=False, save_dvc_exp=False) if is_main_process() else None
    return [StepCallback(live=live), MarkComplete()]


def early_stopping(patience: int) -> list:
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=patience)] if patience else []


# --- the stage -----------------------------------------------------------------------------------

def train(params: Params, data_dir: Path, base_dir: Path, out: Path, checkpoints: Path, live_dir: Path) -> dict:
    """Run the Trainer, save the model to `out`, and return the run's metrics."""
    import datasets

    t = params.train
    precision = resolve_precision(t.precision)
    if not (data_dir / "dataset_dict.json").exists():
        raise PipelineError(f"{data_dir} is not a processed dataset; run preprocess first (dvc repro preprocess)")
    blocks = datasets.load_from_disk(str(data_dir))
    tokenizer = load_tokenizer(base_dir, params.model.trust_remote_code)
    model, vocab = prepare_model(load_model(base_dir, params.model.trust_remote_code), t)
    n_params, n_trainable = count_parameters(model, vocab)
    block_size = len(blocks["train"][0]["input_ids"])

    args = training_arguments(params, precision, checkpoints)
    config = model.config
    if t.memory_preflight:
        preflight(estimate_memory(n_params, n_trainable, config.num_hidden_layers, config.hidden_size,
                                  config.num_attention_heads, vocab, t.per_device_train_batch_size, block_size,
                                  precision, t.gradient_checkpointing,
                                  "eager" if t.attn_implementation == "eager" else "sdpa", t.loss_chunk_tokens),
                  t.per_device_train_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing,
                  t.lora.enabled, t.loss_chunk_tokens > 0)
    run_id = fingerprint(params, data_dir, base_dir)
    resume_from = resume_checkpoint(checkpoints, run_id)  # every rank decides before rank 0 writes
    attention = choose_attention(model.to(args.device), t.attn_implementation, blocks["train"],
                                 t.per_device_train_batch_size, precision,
                                 started_with(checkpoints).get("attention") if resume_from else None)
    with args.main_process_first(desc="prepare checkpoints"):
        if resume_from is None and is_main_process():
            start_fresh(checkpoints, run_id, attention["attention"])
    args.eval_on_start = resume_from is None  # step 0: the base model's validation loss, for plot and card

    effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    tokens_per_step = effective_batch * block_size
    flops = flops_per_token(n_params - _position_count(model), config.num_hidden_layers, config.hidden_size,
                            block_size)
    peak, peak_source = peak_flops(precision)
    log.info("precision %s; %s of %s parameters trainable; effective batch %d blocks = %d per device x %d "
             "accumulation x %d devices (%d tokens)%s", precision, f"{n_trainable:,}", f"{n_params:,}",
             effective_batch, args.per_device_train_batch_size, args.gradient_accumulation_steps, args.world_size,
             tokens_per_step, f"; resuming from {resume_from}" if resume_from else "")

    trainer = make_trainer(model, args, blocks, tokenizer, vocab, t.loss_chunk_tokens,
                           callbacks(live_dir, resume_from is not None, tokens_per_step, flops, peak)
                           + early_stopping(t.early_stopping_patience))
    start_step, started = _checkpoint_step(resume_from), time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    # throughput is of training: the evaluations inside train() (step 0, every eval_steps) are taken out;
    # a resumed run's history also holds the earlier run's, up to and including its resume step
    history = trainer.state.log_history  # the final evaluate() below appends to it too
    eval_seconds = sum(h["eval_runtime"] for h in history
                       if "eval_runtime" in h and (h["step"] > start_step or not start_step))
    evaluated_last_step = t.eval_steps and trainer.state.global_step % t.eval_steps == 0
    final_eval = {} if evaluated_last_step and not t.load_best_model_at_end else trainer.evaluate()

    step = trainer.state.global_step
    tokens_per_second = (step - start_step) * tokens_per_step / (seconds - eval_seconds) if seconds else None
    peak_bytes, peak_kind = peak_memory_used()
    metrics = {
        "train_loss": result.training_loss,
        "final_train_loss": last_logged(history, "loss"),
        "eval_loss": final_eval.get("eval_loss", last_logged(history, "eval_loss")),
        "base_eval_loss": next((h["eval_loss"] for h in history if h.get("step") == 0 and "eval_loss" in h), None),
        "steps": step, "epochs": trainer.state.epoch, "tokens_seen": step * tokens_per_step,
        "effective_batch_size": effective_batch, "effective_batch_tokens": tokens_per_step,
        "tokens_per_second": tokens_per_second, "wall_seconds": seconds, "eval_seconds": eval_seconds,
        "mfu": tokens_per_second * flops / peak if tokens_per_second else None,
        "flops_per_token": flops, "device_peak_flops": peak, "device_peak_source": peak_source,
        "peak_memory_gib": peak_bytes / 1024**3, "peak_memory_kind": peak_kind,
        "precision": precision, **attention, "world_size": args.world_size,
        "resumed_from_step": start_step or None, "best_checkpoint": trainer.state.best_model_checkpoint,
        "parameters": n_params, "trainable_parameters": n_trainable,
    }
    if trainer.is_world_process_zero():
        card = model_card(params, json.loads((base_dir / "provenance.json").read_text()), metrics["base_eval_loss"],
                          metrics["eval_loss"], metrics, lock_hashes([str(base_dir), str(data_dir)]), git_commit())
        save(trainer, args, out, vocab, t.lora.enabled, card)
    return metrics


def _position_count(model: Any) -> int:
    return sum(p.numel() for module in _position_embeddings(without_adapters(model)) for p in module.parameters())


def save(trainer: Any, args: Any, out: Path, vocab: int, lora: bool, card: str) -> None:
    """models/finetuned: a plain model (adapters merged, padding trimmed, safetensors), its tokenizer, its
    model card (README.md), and for LoRA the adapter alone in adapter/."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    with atomic_dir(out) as tmp:
        if lora:
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
        if model.get_input_embeddings().weight.shape[0] != vocab:
            model.resize_token_embeddings(vocab)
        model.config.use_cache = True
        model.save_pretrained(tmp)
        trainer.processing_class.save_pretrained(tmp)
        write_text(tmp / "training_args.json", args.to_json_string())  # not the pickled training_args.bin
        write_text(tmp / "README.md", card)


def last_logged(history: list[dict], key: str) -> float | None:
    return next((entry[key] for entry in reversed(history) if key in entry), None)


def relaunch_under_torchrun() -> None:
    """With NPROC_PER_NODE=N (N > 1), re-run this stage as `torchrun --nproc_per_node N -m pipeline.train ...`:
    data-parallel training (DDP through the Trainer; NCCL on GPUs, gloo on CPU) without changing dvc.yaml."""
    value = os.environ.get("NPROC_PER_NODE", "1") or "1"
    if not value.isdigit() or int(value) < 1:
        raise PipelineError(f"NPROC_PER_NODE={value!r} is not a process count; set it to the number of GPUs, e.g. 2")
    if int(value) > 1 and "LOCAL_RANK" not in os.environ:  # torchrun sets LOCAL_RANK in its workers
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={value}",
                   "-m", "pipeline.train", *sys.argv[1:]]
        log.info("launching %s", " ".join(command[1:]))
        os.execv(sys.executable, command)


@stage_command
@params_option
@click.option("--data", "data_dir", default="data/processed", show_default=True, type=click.Path(path_type=Path),
              help="Blocks from preprocess.")
@click.option("--model", "base_dir", default="models/base", show_default=True, type=click.Path(path_type=Path),
              help="Base model from download.")
@click.option("--out", default="models/finetuned", show_default=True, type=click.Path(path_type=Path),
              help="Where the fine-tuned model and tokenizer are saved.")
@click.option("--checkpoints", default="checkpoints", show_default=True, type=click.Path(path_type=Path),
              help="Resumable Trainer checkpoints (kept between runs).")
@click.option("--live-dir", default="dvclive", show_default=True, type=click.Path(path_type=Path),
              help="dvclive directory: per-step loss, learning rate and throughput.")
@click.option("--metrics", "metrics_path", default="metrics/train.json", show_default=True,
              type=click.Path(path_type=Path), help="Summary of the run.")
def main(params_path: str, data_dir: Path, base_dir: Path, out: Path, checkpoints: Path, live_dir: Path,
         metrics_path: Path) -> None:
    """Fine-tune the base model with the Hugging Face Trainer, resuming an interrupted run."""
    params = load_params(params_path)
    relaunch_under_torchrun()
    keep_freed_memory()
    metrics = train(params, data_dir, base_dir, out, checkpoints, live_dir)
    if is_main_process():
        write_json(metrics_path, metrics)
        log.info("train loss %.4f, eval loss %s, %d steps, %.0f tokens/s, MFU %.1f%%, peak memory %.2f GiB",
                 metrics["train_loss"], f"{metrics['eval_loss']:.4f}" if metrics["eval_loss"] is not None else "n/a",
                 metrics["steps"], metrics["tokens_per_second"] or 0, 100 * (metrics["mfu"] or 0),
                 metrics["peak_memory_gib"])


if __name__ == "__main__":
    main()
