"""Sharded training (train.sharding): DeepSpeed ZeRO through the Trainer, and the way back to an
ordinary model. zero2 splits the AdamW states and the gradients across the processes, zero3 the weights
too; each process then holds 1/N of what DDP copies to every one. On save, every process takes part in
gathering the full fp32 weights (the optimizer's master copy, not the 16-bit weights the model computes
with under bf16/fp16), and rank 0 puts them into a plain model, so models/finetuned loads anywhere."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.core.errors import PipelineError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def deepspeed_config(sharding: str) -> dict | None:
    """The DeepSpeed config for train.sharding (None: no DeepSpeed). "auto" values are the Trainer's own
    (batch, accumulation, clipping, bf16/fp16 from the precision, bucket sizes from the model's width); the
    optimizer and schedule stay the Trainer's (train.optim, train.lr_scheduler_type). Otherwise DeepSpeed's
    defaults (overlap_comm: on for ZeRO-3, off for ZeRO-2), except the gradients: under bf16/fp16 DeepSpeed
    would sum them over micro-batches and across processes in the 16-bit type; here in fp32, as DDP does.
    Under ZeRO-3 the Trainer's own saves (the model file of each checkpoint) need the full weights gathered
    in 16 bits (stage3_gather_16bit_weights_on_model_save); models/finetuned is written from the fp32 master
    weights instead (full_fp32_weights)."""
    if sharding == "none":
        return None
    zero: dict = {"stage": int(sharding[-1]), "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if sharding == "zero3":
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size="auto",
                    stage3_param_persistence_threshold="auto")
    return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32",
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_allow_untested_optimizer": True, "wall_clock_breakdown": False}


def gathered_weights(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The full fp32 value of every parameter of a DeepSpeed-wrapped model, on every rank (a collective:
    all ranks call it, in the same order). Trained parameters come from the optimizer's fp32 master
    copy; frozen ones, which have none, from their (gathered) own values. Tied parameters appear once,
    under their first name, as named_parameters gives them."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    # fp32 from the live engine: deepspeed's zero_to_fp32 needs a checkpoint on disk, and the Trainer's save is 16-bit
    weights = {}
    for name, param in model.named_parameters():
        value = safe_get_full_fp32_param(param) if param.requires_grad else None
        if value is None:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                value = param.detach().clone()
        weights[name] = value.detach().float().cpu()
    return weights


def plain_model(model: PreTrainedModel, weights: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A new model of `model`'s class and config, not partitioned, holding `weights` (fp32), its tied
    parameters tied again."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # else from_config builds it partitioned (zero.Init) once more
    plain = type(model)._from_config(model.config).float()  # the weights below are fp32
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    plain.tie_weights()
    tied = {name for name in missing if plain.get_parameter(name) is not None and any(
        plain.get_parameter(name) is plain.get_parameter(other) for other in weights)}
    if unexpected or set(missing) - tied:
        raise PipelineError(f"the gathered weights do not fit {type(model).__name__}: missing "
                            f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}; this is a bug, "
                            "the checkpoints hold the run (report it)")
    return plain
