"""Stage 3, train: fine-tune models/base on data/processed with the Hugging Face Trainer.

set_up (the plan: steps, precision, compile, attention, memory; the model with dropout, padding, freezing or
LoRA and its own loss; checkpoints to resume) -> run (the Trainer) -> save (merged, unpadded, safetensors,
with its model card) and the metrics: steady and whole-run throughput, the training's peak memory beside
its estimate. Multi-GPU (torchrun, see NPROC_PER_NODE) and mixed precision come from the Trainer.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from pipeline.callbacks import (
    early_stopping,
    live_callback,
    progress_callback,
    samples_callback,
    stop_on_non_finite,
    trim_live_log,
)
from pipeline.card import git_commit, lock_hashes, model_card
from pipeline.checkpoints import (
    LIVE,
    checkpoint_step,
    fingerprint,
    mark_complete_callback,
    mark_finished,
    note_other_runs,
    resume_checkpoint,
    run_folder,
    start_fresh,
    started_with,
)
from pipeline.common import PipelineError, check_processes, is_main_process, params_option, stage_command
from pipeline.config import Params
from pipeline.device import keep_freed_memory, resolve_precision
from pipeline.loading import load_saved_dataset, load_tokenizer, read_json
from pipeline.memory import GIB, MemoryEstimate
from pipeline.model import count_parameters, position_parameters, prepare_model, without_adapters
from pipeline.outputs import outputs, write_json, write_text
from pipeline.params import load_params
from pipeline.peak import peak_used, reset_peak
from pipeline.plan import Plan, check_memory, choose_attention, plan
from pipeline.sampling import check_room, context_of
from pipeline.throughput import ThroughputMeter, flops_per_token, meter_callback, peak_flops, warmup_steps

log = logging.getLogger("pipeline.train")


# --- setup ---------------------------------------------------------------------------------------

def training_arguments(params: Params, run: Plan, checkpoints: Path) -> Any:
    """TrainingArguments from params: the one place train.* meets the Trainer's names."""
    from transformers import TrainingArguments

    t, cuda = params.train, run.device == "cuda"
    return TrainingArguments(
        output_dir=str(checkpoints), seed=params.seed, data_seed=params.seed, learning_rate=params.lr,
        num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        optim=t.optimizer, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm, bf16=run.precision == "bf16", fp16=run.precision == "fp16",
        activation_checkpointing=t.gradient_checkpointing, torch_compile=run.compile,
        logging_steps=t.logging_steps, logging_first_step=True, logging_nan_inf_filter=False,
        eval_strategy="steps" if t.eval_steps else "no", eval_steps=t.eval_steps or None,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        load_best_model_at_end=t.load_best_model_at_end, metric_for_best_model="eval_loss", greater_is_better=False,
        dataloader_num_workers=t.dataloader_num_workers,
        # pinned batches copied without blocking: the host never waits for the GPU between steps
        dataloader_pin_memory=cuda, accelerator_config={"non_blocking": cuda},
        use_cpu=not cuda, report_to=trackers(t.report_to), disable_tqdm=True,
    )


def trackers(names: list[str]) -> list[str] | str:
    """train.report_to for the Trainer, each integration checked to be installed."""
    if not names:
        return "none"  # dvclive is added by the stage itself (live_callback)
    from transformers.integrations import get_available_reporting_integrations

    missing = sorted(set(names) - set(get_available_reporting_integrations()))
    if missing:
        raise PipelineError(f"train.report_to: {missing[0]} is not installed; pip install {missing[0]} into this "
                            "environment, or remove it from train.report_to")
    return list(names)



@dataclass
class Setup:
    """Everything decided before the Trainer starts."""

    run: Plan
    blocks: Any
    tokenizer: Any
    model: Any
    vocab: int                  # the real vocabulary (the output matrix may be padded beyond it)
    parameters: tuple[int, int]  # total and trainable, padding rows not counted
    folder: Path                # this run's checkpoints and live log (checkpoints/<fingerprint>)
    resume_from: str | None
    attention: dict
    estimate: MemoryEstimate
    args: Any
    meter: ThroughputMeter
    peak_source: str
    provenance: tuple[dict, dict]  # of the base model and of the blocks, for the model card


def set_up(params: Params, data_dir: Path, base_dir: Path, checkpoints: Path) -> Setup:
    t = params.train
    check_processes("train.dataloader_num_workers", t.dataloader_num_workers)
    blocks = load_saved_dataset(data_dir, "preprocess")
    tokenizer = load_tokenizer(base_dir, params.model.trust_remote_code, "download")
    sources = provenance(base_dir, "download"), provenance(data_dir, "preprocess")  # read now: a damaged one stops here
    run = plan(t, resolve_precision(t.precision), len(blocks["train"]), len(blocks["train"][0]["input_ids"]))
    model, vocab = prepare_model(t, params.model.trust_remote_code, base_dir, tokenizer.pad_token_id)
    if t.samples.every:
        check_room(tokenizer, list(t.samples.prompts), t.samples.max_new_tokens, context_of(model), "train.samples")
    run_id = fingerprint(params, data_dir, base_dir)
    folder = run_folder(checkpoints, run_id)
    resume_from = resume_checkpoint(folder, run_id)  # every rank decides before rank 0 writes
    args = training_arguments(params, run, folder)
    # on the CPU the model is loaded on: CUDA needs no measuring, and the preflight must run before the
    # weights take their share of the GPU (the Trainer moves the model there)
    attention = choose_attention(model, t, run, blocks["train"],
                                 started_with(folder).get("attention") if resume_from else None)
    estimate = check_memory(model, t, run, attention["attention"])
    with args.main_process_first(desc="prepare checkpoints"):
        if is_main_process():
            note_other_runs(checkpoints, folder)
            if resume_from is None:
                start_fresh(folder, run_id, attention["attention"])
            else:
                trim_live_log(folder / LIVE, checkpoint_step(resume_from))
    args.eval_on_start = resume_from is None  # step 0: the base model's validation loss, for plot and card
    if run.compile:  # a new shape (an epoch's last, smaller batch) compiles its own static graph, not a dynamic one
        import torch._dynamo

        torch._dynamo.config.automatic_dynamic_shapes = False
    parameters = count_parameters(model, vocab)
    meter, peak_source = throughput_meter(model, run, parameters[0])
    log.info("precision %s; %s of %s parameters trainable; effective batch %d blocks = %d per device x %d "
             "accumulation x %d devices (%d tokens); %d steps planned%s", run.precision, f"{parameters[1]:,}",
             f"{parameters[0]:,}", run.effective_batch, t.per_device_train_batch_size, t.gradient_accumulation_steps,
             run.world_size, run.tokens_per_step, run.steps, f"; resuming from {resume_from}" if resume_from else "")
    return Setup(run, blocks, tokenizer, model, vocab, parameters, folder, resume_from, attention, estimate, args,
                 meter, peak_source, sources)


def throughput_meter(model: Any, run: Plan, n_params: int) -> tuple[ThroughputMeter, str]:
    """The meter of this run's throughput (FLOPs per token of this model), and where the peak comes from."""
    config = without_adapters(model).config
    peak, source = peak_flops(run.precision)
    flops = flops_per_token(n_params - position_parameters(model), config.num_hidden_layers, config.hidden_size,
                            run.block_size)
    return ThroughputMeter(run.tokens_per_step, flops, peak, warmup=warmup_steps(run.steps)), source


def make_trainer(s: Setup, params: Params) -> Any:
    from transformers import PrinterCallback, Trainer, default_data_collator

    t, resume, live_dir = params.train, s.resume_from is not None, s.folder / LIVE
    callbacks = [meter_callback(s.meter), stop_on_non_finite(), progress_callback(s.run.tokens_per_step),
                 live_callback(live_dir, resume), mark_complete_callback(),
                 *samples_callback(t.samples, s.tokenizer, live_dir, s.meter, resume),
                 *early_stopping(t.early_stopping_patience)]
    trainer = Trainer(model=s.model, args=s.args, train_dataset=s.blocks["train"], eval_dataset=s.blocks["validation"],
                      data_collator=default_data_collator, processing_class=s.tokenizer, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # its raw dicts: progress_callback says it in one line
    return trainer


# --- the stage -----------------------------------------------------------------------------------

def train(params: Params, data_dir: Path, base_dir: Path, out: Path, checkpoints: Path, live_dir: Path,
          metrics_path: Path) -> dict:
    """Set up, run the Trainer, and put the model (`out`), its live log (`live_dir`) and the run's metrics
    (`metrics_path`) in place together; returns the metrics."""
    s = set_up(params, data_dir, base_dir, checkpoints)
    trainer = make_trainer(s, params)
    since_reset = reset_peak()  # the reported peak is the training's, not the set-up's
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=s.resume_from)
    seconds = time.perf_counter() - started
    memory = memory_metrics(s.estimate, since_reset)  # before the final evaluation, which is not training
    metrics = {**run_metrics(trainer, result, seconds, checkpoint_step(s.resume_from), s.meter, s.run), **memory,
               "device_peak_source": s.peak_source, "precision": s.run.precision, **s.attention,
               "torch_compile": s.run.compile, "world_size": s.args.world_size, "parameters": s.parameters[0],
               "trainable_parameters": s.parameters[1]}
    if trainer.is_world_process_zero():
        card = model_card(params.train, params.seed, params.lr, *s.provenance,
                          (metrics["base_eval_loss"], metrics["eval_loss"]), metrics,
                          lock_hashes([str(base_dir), str(data_dir)]), git_commit())
        with outputs(out, live_dir, metrics_path) as (model_tmp, live_tmp, metrics_tmp):
            save(trainer, s.args, model_tmp, s.vocab, params.train.lora.enabled, card)
            shutil.copytree(s.folder / LIVE, live_tmp)
            write_json(metrics_tmp, metrics)
        mark_finished(s.folder)
    return metrics


def provenance(directory: Path, made_by: str) -> dict:
    """The provenance.json an earlier stage wrote beside its output ({} for older outputs without one)."""
    path = directory / "provenance.json"
    return read_json(path, made_by) if path.exists() else {}


def memory_metrics(estimate: MemoryEstimate, since_reset: bool) -> dict:
    """The training's peak beside its estimate (on CUDA the same measure: tensor memory; on a CPU the
    peak is the whole process's resident memory, libraries and data included)."""
    peak, kind = peak_used(since_reset)
    return {"peak_memory_gib": peak / GIB, "peak_memory_kind": kind, "memory_estimate_gib": estimate.total / GIB}


def run_metrics(trainer: Any, result: Any, seconds: float, start_step: int, meter: ThroughputMeter, run: Plan) -> dict:
    """metrics/train.json: losses, steady and whole-run throughput."""
    t = trainer.args
    # whole run: the evaluations inside train() (step 0, every eval_steps) are taken out; a resumed run's
    # history also holds the earlier run's, up to and including its resume step
    history = trainer.state.log_history  # the final evaluate() below appends to it too
    eval_seconds = sum(h["eval_runtime"] for h in history
                       if "eval_runtime" in h and (h["step"] > start_step or not start_step))
    # with eval_steps the Trainer has evaluated the last step itself; without, evaluate once here
    final_eval = trainer.evaluate() if t.eval_strategy == "no" else {}
    # load_best_model_at_end: the saved model is the best checkpoint, whose loss the Trainer kept
    best = trainer.state.best_metric if t.load_best_model_at_end else None
    step = trainer.state.global_step
    trained = step - start_step  # 0 when a run stopped after its last checkpoint is run again
    tokens_per_second = trained * run.tokens_per_step / (seconds - eval_seconds) if trained else None
    return {
        "train_loss": whole_run_loss(history, start_step, result.training_loss, trained),
        "final_train_loss": last_logged(history, "loss"),
        "eval_loss": final_eval.get("eval_loss", best if best is not None else last_logged(history, "eval_loss")),
        "base_eval_loss": next((h["eval_loss"] for h in history if h.get("step") == 0 and "eval_loss" in h), None),
        "steps": step, "epochs": trainer.state.epoch, "tokens_seen": step * run.tokens_per_step,
        "effective_batch_size": run.effective_batch, "effective_batch_tokens": run.tokens_per_step,
        **meter.steady(),
        "tokens_per_second": tokens_per_second, "mfu": tokens_per_second * meter.flops_per_token / meter.peak_flops
        if tokens_per_second else None,
        "wall_seconds": seconds, "eval_seconds": eval_seconds,
        "flops_per_token": meter.flops_per_token, "device_peak_flops": meter.peak_flops,
        "resumed_from_step": start_step or None, "best_checkpoint": trainer.state.best_model_checkpoint,
    }


def save(trainer: Any, args: Any, out: Path, vocab: int, lora: bool, card: str) -> None:
    """models/finetuned: a plain model (adapters merged, padding trimmed, safetensors), its tokenizer, its
    model card (README.md), and for LoRA the adapter alone in adapter/."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if lora:
        model.save_pretrained(out / "adapter")  # the adapters alone (model.add_lora), for the unpadded base
        model = model.merge_and_unload()
    if model.get_input_embeddings().weight.shape[0] != vocab:
        model.resize_token_embeddings(vocab)
    model.config.use_cache = True
    model.save_pretrained(out)
    trainer.processing_class.save_pretrained(out)
    write_text(out / "training_args.json", args.to_json_string())  # not the pickled training_args.bin
    write_text(out / "README.md", card)


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


@stage_command
@params_option
@click.option("--data", "data_dir", default="data/processed", show_default=True, type=click.Path(path_type=Path),
              help="Blocks from preprocess.")
@click.option("--model", "base_dir", default="models/base", show_default=True, type=click.Path(path_type=Path),
              help="Base model from download.")
@click.option("--out", default="models/finetuned", show_default=True, type=click.Path(path_type=Path),
              help="Where the fine-tuned model and tokenizer are saved.")
@click.option("--checkpoints", default="checkpoints", show_default=True, type=click.Path(path_type=Path),
              help="Resumable Trainer checkpoints, a folder per run (kept between runs).")
@click.option("--live-dir", default="dvclive", show_default=True, type=click.Path(path_type=Path),
              help="dvclive directory: per-step loss, learning rate and throughput (written as the run ends; "
                   "while it runs: checkpoints/<run>/dvclive).")
@click.option("--metrics", "metrics_path", default="metrics/train.json", show_default=True,
              type=click.Path(path_type=Path), help="Summary of the run.")
def main(params_path: str, data_dir: Path, base_dir: Path, out: Path, checkpoints: Path, live_dir: Path,
         metrics_path: Path) -> None:
    """Fine-tune the base model with the Hugging Face Trainer, resuming an interrupted run."""
    params = load_params(params_path)
    relaunch_under_torchrun()
    keep_freed_memory()
    metrics = train(params, data_dir, base_dir, out, checkpoints, live_dir, metrics_path)
    if is_main_process():
        log.info(summary_line(metrics))


if __name__ == "__main__":
    main()
