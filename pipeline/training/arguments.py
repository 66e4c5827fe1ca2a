"""The Trainer's arguments from params: the one place train.* meets the Trainer's names."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import Params
from pipeline.core.errors import PipelineError
from pipeline.training.distributed.sharding import deepspeed_config
from pipeline.training.plan import Plan

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments


# train.* keys named and meant as TrainingArguments' fields: handed over as they are
AS_THE_TRAINER_NAMES = ("num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                        "gradient_accumulation_steps", "optim", "lr_scheduler_type", "warmup_steps", "weight_decay",
                        "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "logging_steps", "save_steps",
                        "save_total_limit", "load_best_model_at_end", "dataloader_num_workers")


def training_arguments(params: Params, plan: Plan, checkpoints: Path, find_unused: bool = False, best: str = "loss"
                       ) -> TrainingArguments:
    """TrainingArguments from params: the keys the Trainer names alike passed through, the rest decided here
    or by the plan. `find_unused`: the model has trainable parameters its loss does not use
    (plan.find_unused_parameters); `best`: the evaluation metric the best checkpoint is chosen by (the
    task's)."""
    from transformers import TrainingArguments

    t, cuda = params.train, plan.device == "cuda"
    return TrainingArguments(
        **{name: getattr(t, name) for name in AS_THE_TRAINER_NAMES},
        output_dir=str(checkpoints), seed=params.seed, data_seed=params.seed,
        learning_rate=params.lr,  # top level in params.yaml: dvc exp run -S lr=...
        bf16=plan.precision == "bf16", fp16=plan.precision == "fp16",  # train.precision, resolved for the device
        activation_checkpointing=t.gradient_checkpointing,  # gradient_checkpointing: its deprecated alias
        torch_compile=plan.compile,  # train.torch_compile: auto decided by the plan
        logging_first_step=True, logging_nan_inf_filter=False,
        eval_strategy="steps" if t.eval_steps else "no", eval_steps=t.eval_steps or None,  # 0: only at the end
        save_strategy="steps", metric_for_best_model=f"eval_{best}", greater_is_better=best != "loss",
        # pinned batches copied without blocking: the host never waits for the GPU between steps
        dataloader_pin_memory=cuda, accelerator_config={"non_blocking": cuda},
        use_cpu=not cuda, report_to=trackers(t.report_to), disable_tqdm=True,
        deepspeed=deepspeed_config(plan.sharding), ddp_find_unused_parameters=find_unused,
    )


def bucket_view_gradients(trainer: Trainer) -> None:
    """DDP's gradients as views into its all-reduce buckets (gradient_as_bucket_view), not a second copy
    of them beside the buckets (4 bytes per trained parameter). The Trainer has no argument for it; its
    accelerator hands these keyword arguments to DistributedDataParallel when train() wraps the model."""
    trainer.accelerator.ddp_handler.gradient_as_bucket_view = True


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
