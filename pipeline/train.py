"""Stage 3, train: fine-tune models/base on data/processed with the Hugging Face Trainer.

Multi-GPU (torchrun / accelerate launch) and mixed precision come from the Trainer. Metrics and
per-step plots go through dvclive (dvcyaml=False: dvc.yaml declares them). Checkpoints go to
`checkpoints/`, a `persist: true` out: an interrupted `dvc repro` resumes from the last one, but
only when it was made by the same params, data and base model (a fingerprint guards it), so a new
experiment never continues an old one.
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
from pipeline.config import Params, load_params

log = logging.getLogger("pipeline.train")
FINGERPRINT = "fingerprint.json"
NOT_PLOTTED = {"epoch", "train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second",
               "total_flos", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


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
        logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy="steps" if t.eval_steps else "no", eval_steps=t.eval_steps or None,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        dataloader_num_workers=t.dataloader_num_workers, dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(), report_to="none", disable_tqdm=True,
    )


def fingerprint(params: Params, data_dir: Path, base_dir: Path) -> str:
    """What a checkpoint must match to be resumed: training params and the exact inputs."""
    inputs = {p.relative_to(data_dir).as_posix(): p.read_text() for p in sorted(data_dir.glob("*/state.json"))}
    for name in ("config.json", "provenance.json"):
        if (base_dir / name).exists():
            inputs[name] = (base_dir / name).read_text()
    return digest({"train": asdict(params.train), "lr": params.lr, "seed": params.seed, "inputs": inputs})


def resume_checkpoint(checkpoints: Path, run_id: str) -> str | None:
    """The last checkpoint of an interrupted run with the same fingerprint, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    marker = checkpoints / FINGERPRINT
    if not checkpoints.is_dir() or not marker.exists():
        return None
    if json.loads(marker.read_text()).get("fingerprint") != run_id:
        log.info("checkpoints in %s come from other params or inputs; starting fresh", checkpoints)
        return None
    return get_last_checkpoint(str(checkpoints))


def start_fresh(checkpoints: Path, run_id: str) -> None:
    remove(checkpoints)
    write_json(checkpoints / FINGERPRINT, {"fingerprint": run_id})


def dvclive_callback(live_dir: Path, resume: bool) -> Any:
    """DVCLiveCallback that logs at the Trainer's global step, without touching dvc.yaml."""
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    class StepCallback(DVCLiveCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            # "loss" is the per-step training loss: plot it as train/loss beside eval/loss; the end-of-run
            # summary (mean train_loss, runtimes) goes to metrics/train.json instead of the plots
            logs = {("train_loss" if k == "loss" else k): v for k, v in (logs or {}).items() if k not in NOT_PLOTTED}
            if not logs:
                return
            if self.live is not None:
                self.live.step = state.global_step  # train and eval rows line up on the same x axis
            super().on_log(args, state, control, logs=logs, **kwargs)

    live = Live(str(live_dir), resume=resume, dvcyaml=False, save_dvc_exp=False) if is_main_process() else None
    return StepCallback(live=live)


def train(params: Params, data_dir: Path, base_dir: Path, out: Path, checkpoints: Path, live_dir: Path) -> dict:
    """Run the Trainer, save the model to `out`, and return the run's metrics."""
    import datasets
    from transformers import Trainer

    precision = resolve_precision(params.train.precision)
    if not (data_dir / "dataset_dict.json").exists():
        raise PipelineError(f"{data_dir} is not a processed dataset; run preprocess first (dvc repro preprocess)")
    blocks = datasets.load_from_disk(str(data_dir))
    tokenizer = load_tokenizer(base_dir, params.model.trust_remote_code)
    model = load_model(base_dir, params.model.trust_remote_code)

    args = training_arguments(params, precision, checkpoints)
    run_id = fingerprint(params, data_dir, base_dir)
    resume_from = resume_checkpoint(checkpoints, run_id)  # every rank decides before rank 0 writes
    with args.main_process_first(desc="prepare checkpoints"):
        if resume_from is None and is_main_process():
            start_fresh(checkpoints, run_id)

    block_size = len(blocks["train"][0]["input_ids"])
    effective_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    log.info("precision %s; effective batch %d blocks = %d per device x %d accumulation x %d devices (%d tokens)%s",
             precision, effective_batch, args.per_device_train_batch_size, args.gradient_accumulation_steps,
             args.world_size, effective_batch * block_size, f"; resuming from {resume_from}" if resume_from else "")

    trainer = Trainer(model=model, args=args, train_dataset=blocks["train"], eval_dataset=blocks["validation"],
                      data_collator=collate_blocks, processing_class=tokenizer,
                      callbacks=[dvclive_callback(live_dir, resume=resume_from is not None)])
    start_step, started = _checkpoint_step(resume_from), time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    evaluated_last_step = params.train.eval_steps and trainer.state.global_step % params.train.eval_steps == 0
    final_eval = {} if evaluated_last_step else trainer.evaluate()

    step = trainer.state.global_step
    tokens_this_run = (step - start_step) * effective_batch * block_size
    history = trainer.state.log_history
    metrics = {
        "train_loss": result.training_loss,
        "final_train_loss": last_logged(history, "loss"),
        "eval_loss": final_eval.get("eval_loss", last_logged(history, "eval_loss")),
        "steps": step, "epochs": trainer.state.epoch, "tokens_seen": step * effective_batch * block_size,
        "effective_batch_size": effective_batch, "effective_batch_tokens": effective_batch * block_size,
        "tokens_per_second": tokens_this_run / seconds if seconds else None, "wall_seconds": seconds,
        "precision": precision, "world_size": args.world_size, "resumed_from_step": start_step or None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    if trainer.is_world_process_zero():
        with atomic_dir(out) as tmp:
            trainer.save_model(str(tmp))  # safetensors, with the tokenizer (processing_class)
            (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; keep the directory pickle-free
            write_text(tmp / "training_args.json", args.to_json_string())
    return metrics


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


def last_logged(history: list[dict], key: str) -> float | None:
    return next((entry[key] for entry in reversed(history) if key in entry), None)


def _checkpoint_step(checkpoint: str | None) -> int:
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0


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
              help="dvclive directory: per-step loss and learning rate.")
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
        log.info("train loss %.4f, eval loss %s, %d steps, %.0f tokens/s", metrics["train_loss"],
                 f"{metrics['eval_loss']:.4f}" if metrics["eval_loss"] is not None else "n/a", metrics["steps"],
                 metrics["tokens_per_second"] or 0)


if __name__ == "__main__":
    main()
