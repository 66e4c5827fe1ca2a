"""Stage 3, train: fine-tune models/base on data/processed with the Hugging Face Trainer.

set_up, a walk down _setup_* steps (the inputs; the task's model: head, padding, freezing or LoRA; the
plan: steps, precision, compile; this run's checkpoint folder; attention; memory; the throughput meter)
-> run (the Trainer) -> save (merged, unpadded, safetensors, with its task's model card) and the metrics:
steady and whole-run throughput, the training's peak memory beside its estimate. Several GPUs and hosts
(torchrun: pipeline.training.distributed.launch), sharding (DeepSpeed ZeRO: its sharding.py) and mixed
precision come through the Trainer.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pipeline.core.cli import check_processes, is_main_process, params_option, stage_command
from pipeline.core.config import Params
from pipeline.core.device import keep_freed_memory
from pipeline.core.errors import PipelineError
from pipeline.core.loading import load_saved_dataset, load_tokenizer, read_json
from pipeline.core.outputs import outputs, write_json, write_text
from pipeline.core.preamble import start_stage
from pipeline.tasks import DEFAULT_TASK, task_part
from pipeline.training.arguments import bucket_view_gradients, training_arguments
from pipeline.training.attention import Attention, choose_attention
from pipeline.training.callbacks import finite_weights, training_callbacks
from pipeline.training.card import git_commit, lock_hashes
from pipeline.training.checkpoints import (
    LIVE,
    RunFolder,
    checkpoint_step,
    mark_finished,
    open_run,
    started_with,
    this_run,
)
from pipeline.training.distributed.launch import processes_per_node, run_under_torchrun
from pipeline.training.distributed.sharding import gathered_weights, plain_model
from pipeline.training.memory.estimate import MemoryEstimate, estimated_memory
from pipeline.training.memory.peak import memory_metrics, reset_peak
from pipeline.training.metrics import run_metrics, summary_line
from pipeline.training.model import count_parameters
from pipeline.training.plan import Plan, find_unused_parameters, make_plan
from pipeline.training.throughput import ThroughputMeter, run_meter

if TYPE_CHECKING:
    from types import ModuleType

    from datasets import DatasetDict
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

log = logging.getLogger(__spec__.name)  # under python -m, __name__ is "__main__"


# --- set-up: each step returns one small value ---------------------------------------------------

@dataclass(frozen=True)
class Inputs:
    """What the stages before wrote: the blocks and the tokenizer, and the provenance of the base model and
    of the blocks, for the model card; and, where the task has labels, the names the blocks' ids stand for."""

    blocks: DatasetDict
    tokenizer: PreTrainedTokenizerBase
    base_made: dict  # models/base/provenance.json
    data_made: dict  # data/processed/provenance.json
    labels: list[str] | None


@dataclass(frozen=True)
class Trainable:
    """The model as it will train, its real vocabulary (the output matrix may be padded beyond it), and
    its parameters, total and trainable, padding rows not counted."""

    model: PreTrainedModel
    vocab: int
    parameters: int
    trainable_parameters: int


@dataclass(frozen=True)
class Setup:
    """Everything decided before the Trainer starts, and the task's part of the train stage."""

    task: ModuleType
    inputs: Inputs
    trainable: Trainable
    run: RunFolder
    plan: Plan
    attention: Attention
    memory: MemoryEstimate
    args: TrainingArguments
    meter: ThroughputMeter


def set_up(params: Params, data_dir: Path, base_dir: Path, checkpoints: Path) -> Setup:
    t, task = params.train, task_part(params.task, "train")
    check_processes("train.dataloader_num_workers", t.dataloader_num_workers)
    inputs = _setup_inputs(params, data_dir, base_dir, task)
    train_blocks = inputs.blocks["train"]
    plan = make_plan(t, len(train_blocks), len(train_blocks[0]["input_ids"]))
    trainable = _setup_model(params, base_dir, inputs, task)
    run = this_run(params, data_dir, base_dir, checkpoints)  # every rank decides before rank 0 writes
    args = training_arguments(params, plan, run.path, find_unused_parameters(trainable.model, plan, train_blocks),
                              task.best_metric(params))
    # on the CPU the model is loaded on: CUDA needs no measuring, and the preflight must run before the
    # weights take their share of the GPU (the Trainer moves the model there)
    attention = choose_attention(trainable.model, t, plan, train_blocks,
                                 started_with(run.path).get("attention") if run.resume_from else None)
    memory = estimated_memory(trainable.model, t, plan, attention.implementation)
    _setup_checkpoints(args, checkpoints, run, attention)
    meter = run_meter(trainable.model, trainable.vocab, plan)
    log.info("precision %s; %s of %s parameters trainable; effective batch %d blocks = %d per device x %d "
             "accumulation x %d devices (%d tokens); %d steps planned%s", plan.precision,
             f"{trainable.trainable_parameters:,}", f"{trainable.parameters:,}", plan.effective_batch,
             t.per_device_train_batch_size, t.gradient_accumulation_steps, plan.world_size, plan.tokens_per_step,
             plan.steps, f"; resuming from {run.resume_from}" if run.resume_from else "")
    return Setup(task, inputs, trainable, run, plan, attention, memory, args, meter)


def _setup_inputs(params: Params, data_dir: Path, base_dir: Path, task: ModuleType) -> Inputs:
    blocks = load_saved_dataset(data_dir, "preprocess")
    tokenizer = load_tokenizer(base_dir, params.model.trust_remote_code, "download")
    # read now, not after training: a damaged one stops the stage here
    base_made = read_json(base_dir / "provenance.json", "download")
    data_made = read_json(data_dir / "provenance.json", "preprocess")
    made_for = data_made.get("task", DEFAULT_TASK)
    if made_for != params.task:
        raise PipelineError(f"{data_dir} was made for task: {made_for}, and task is {params.task}; re-run "
                            "preprocess (dvc repro -f preprocess)")
    return Inputs(blocks, tokenizer, base_made, data_made, task.labels(data_made, data_dir))


def _setup_model(params: Params, base_dir: Path, inputs: Inputs, task: ModuleType) -> Trainable:
    model, vocab = task.prepare_model(params, base_dir, inputs.tokenizer, inputs.data_made, inputs.labels)
    return Trainable(model, vocab, *count_parameters(model, vocab))


def _setup_checkpoints(args: TrainingArguments, checkpoints: Path, run: RunFolder, attention: Attention) -> None:
    """Rank 0 opens the run's folder (the others wait for it), and the arguments that depend on resuming."""
    with args.main_process_first(desc="prepare checkpoints"):
        if is_main_process():
            open_run(run, checkpoints, attention.implementation)
    args.eval_on_start = run.resume_from is None  # step 0: the base model's validation loss, for plot and card
    if args.torch_compile:  # a new shape (an epoch's last, smaller batch) compiles its own static graph
        import torch._dynamo

        torch._dynamo.config.automatic_dynamic_shapes = False


def make_trainer(s: Setup, params: Params) -> Trainer:
    from transformers import PrinterCallback, Trainer, default_data_collator

    callbacks = training_callbacks(params.train, s.inputs.tokenizer, s.run.path / LIVE, s.meter,
                                   s.plan.tokens_per_step, s.run.resume_from is not None)
    task = s.task.trainer_options(s.trainable.model, s.inputs.blocks, s.inputs.labels, params,
                                  s.attention.implementation)
    trainer = Trainer(model=s.trainable.model, args=s.args, data_collator=default_data_collator,
                      processing_class=s.inputs.tokenizer, callbacks=callbacks, **task)
    trainer.remove_callback(PrinterCallback)  # its raw dicts: progress_callback says it in one line
    bucket_view_gradients(trainer)
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
    result = run_trainer(trainer, s)
    seconds = time.perf_counter() - started
    memory = memory_metrics(s.memory, since_reset)  # before the final evaluation, which is not training
    metrics = {**run_metrics(trainer, result, seconds, checkpoint_step(s.run.resume_from), s.meter, s.plan),
               **memory, "device_peak_source": s.meter.peak_source, "precision": s.plan.precision,
               **s.attention.metrics(), "torch_compile": s.plan.compile, "world_size": s.args.world_size,
               "parameters": s.trainable.parameters, "trainable_parameters": s.trainable.trainable_parameters}
    # sharded: every rank takes part in gathering the full weights; rank 0 saves them
    weights = gathered_weights(trainer.model) if s.plan.sharding != "none" else None
    finite_weights(trainer.model.named_parameters() if weights is None else weights.items())
    if metrics.get("base_eval_loss") is not None and metrics.get("eval_loss") == metrics["base_eval_loss"]:
        log.warning("the validation loss did not move from the base model's (%.6f): nothing was learnt; raise lr "
                    "(now %g) or train.max_grad_norm, or check that train.freeze leaves something to train",
                    metrics["eval_loss"], params.lr)
    if trainer.is_world_process_zero():
        inputs, commit = lock_hashes([str(base_dir), str(data_dir)]), git_commit()
        card = s.task.card(params, s.inputs.base_made, s.inputs.data_made, metrics, inputs, commit)
        with outputs(out, live_dir, metrics_path) as (model_tmp, live_tmp, metrics_tmp):
            save(trainer, s.args, model_tmp, s.trainable.vocab, params.train.lora.enabled, card, weights)
            shutil.copytree(s.run.path / LIVE, live_tmp)
            s.task.finish_live_log(live_tmp)
            write_json(metrics_tmp, metrics)
        mark_finished(s.run.path)
    return metrics


def run_trainer(trainer: Trainer, s: Setup):  # noqa: ANN201 - the Trainer's TrainOutput
    """trainer.train; one line instead of a traceback where memory ran out (the preflight off, or its
    estimate short) or another process of the run went away (killed, out of memory, its host down)."""
    import torch
    import torch.distributed as dist

    try:
        return trainer.train(resume_from_checkpoint=s.run.resume_from)
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e):
            raise PipelineError(f"training ran out of memory on {s.plan.device} (the estimate said "
                                f"{s.memory.total / 2**30:.1f} GiB); lower train.per_device_train_batch_size (now "
                                f"{s.args.per_device_train_batch_size}), set train.gradient_checkpointing: true, or "
                                "turn train.memory_preflight on to be told the batch that fits") from None
        lost = isinstance(e, dist.DistError) or "Connection closed by peer" in str(e) or "Connection reset" in str(e)
        if s.plan.world_size == 1 or not lost:
            raise
        raise PipelineError(f"train: process {os.environ.get('RANK', '?')} of {s.plan.world_size} lost another "
                            "process of the run (it stopped, or its host went away); its log says why; run again "
                            "to resume from the last checkpoint") from None


def save(trainer: Trainer, args: TrainingArguments, out: Path, vocab: int, lora: bool, card: str,
         weights: dict | None = None) -> None:
    """models/finetuned: a plain model (adapters merged, padding trimmed, safetensors), its tokenizer, its
    model card (README.md), and for LoRA the adapter alone in adapter/. `weights`: a sharded run's
    gathered fp32 weights, put into a model of their own."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if weights is not None:
        model = plain_model(model, weights)
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


@stage_command(on_stop="no output is half-written; run it again: train resumes from its last checkpoint")
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
    params = start_stage("train", params_path, gpus=processes_per_node(dict(os.environ)))
    if run_under_torchrun():
        return  # its workers trained and wrote the outputs
    keep_freed_memory()
    metrics = train(params, data_dir, base_dir, out, checkpoints, live_dir, metrics_path)
    if is_main_process():
        log.info(summary_line(metrics))


if __name__ == "__main__":
    main()
