"""Next-token cross-entropy of a causal LM whose output matrix may be padded beyond the real
vocabulary (`pad_vocab`, for faster matmuls): the padding rows never take part.

- Training: `causal_lm_loss(vocab)` is set as the model's `loss_function`, the hook transformers
  models call from their own forward. So the loss is computed inside the model, and with
  torch_compile inside the compiled region, where inductor fuses the fp32 upcast, the log-softmax
  and their gradient; the Trainer calls the model as it would any other. Given labels, the model
  returns the loss without its logits (`loss_without_logits`).
- Evaluation: `summed_nll` sums the loss of a batch without gradients, in fp32, with GPT-2's output
  layer taken `chunk` tokens at a time, so a large evaluation batch never holds B x T x V logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import wraps
from types import MethodType
from typing import TYPE_CHECKING, Any

from pipeline.core.common import IGNORE_INDEX

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import PreTrainedModel

EVAL_CHUNK = 1024  # tokens per chunk of the output layer in evaluation
TENSOR_CORE_ROWS = 64  # GPT-2's 50257 rows -> 50304: a multiple tensor cores and vector units take whole


def pad_vocab(model: PreTrainedModel, multiple: int) -> int:
    """Pad the (tied) embedding/output matrix to a multiple of `multiple` rows for faster matmuls
    (GPT-2's 50257 -> 50304); returns the real size. The padding rows are never inputs and the losses
    here leave them out, so they change nothing."""
    vocab = model.get_input_embeddings().weight.shape[0]
    if multiple and vocab % multiple:
        model.resize_token_embeddings(vocab, pad_to_multiple_of=multiple, mean_resizing=False)
    return vocab


def causal_lm_loss(vocab: int) -> Callable[..., Tensor]:
    """A `loss_function` for a transformers causal LM: transformers' ForCausalLMLoss (labels shifted,
    fp32, summed and divided by the Trainer's token count over the whole accumulated batch, or the
    mean without it), over the first `vocab` logits only."""

    def loss_function(logits: Tensor, labels: Tensor, vocab_size: int | None = None,
                      num_items_in_batch: Tensor | int | None = None, ignore_index: int = IGNORE_INDEX,
                      shift_labels: Tensor | None = None, **kwargs: Any) -> Tensor:
        import torch.nn.functional as F

        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        targets = shift_labels.reshape(-1).to(logits.device)
        total = F.cross_entropy(logits[..., :vocab].float().reshape(-1, vocab), targets, ignore_index=ignore_index,
                                reduction="sum")
        if num_items_in_batch is None:
            return total / (targets != ignore_index).sum().clamp(min=1)
        return total / (num_items_in_batch.to(total.device) if hasattr(num_items_in_batch, "to")
                        else num_items_in_batch)

    return loss_function


def loss_without_logits(model: PreTrainedModel) -> None:
    """Make `model` return no logits from a forward given labels: its loss is computed inside it, and no
    one reads a causal LM's logits in training (the Trainer has no metrics for it; evaluation and
    generation pass no labels). Under mixed precision accelerate wraps the forward to cast every output
    to fp32, so the logits were copied at every micro-step and thrown away: B x T x V x 4 bytes, 3.1 GiB
    for gpt2 at batch 16 x 1024. Set on the instance, so whatever calls it runs it: accelerate's
    wrapper, torch.compile (the Trainer compiles the model around it), peft's LoRA model (it calls its
    base model's forward) and DeepSpeed's engine."""
    from transformers.utils import ModelOutput

    forward = type(model).forward

    @wraps(forward)  # the signature the Trainer reads to keep the dataset's columns the model takes
    def loss_only(self: PreTrainedModel, *args: Any, labels: Tensor | None = None, **kwargs: Any) -> Any:
        outputs = forward(self, *args, labels=labels, **kwargs)
        if labels is None or not isinstance(outputs, ModelOutput):
            return outputs
        return dataclasses.replace(outputs, logits=None)  # a ModelOutput keeps a field set to None as a key

    model.forward = MethodType(loss_only, model)


def summed_nll(model: PreTrainedModel, input_ids: Tensor, labels: Tensor, vocab: int,
               attention_mask: Tensor | None = None, chunk: int = EVAL_CHUNK) -> tuple[Tensor, Tensor]:
    """Summed next-token NLL (fp32) of a batch and the number of predicted tokens, without gradients.
    GPT-2's logits are a plain product with its output matrix, so they are formed `chunk` tokens at
    a time from the transformer's final hidden states, with the whole (padded) matrix, cast once under
    autocast, the padding's logits dropped; other architectures may shape their logits (scaling,
    soft-capping), so for them the loss is taken from the logits they return."""
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:].reshape(-1)
    count = (targets != IGNORE_INDEX).sum()
    if model.config.model_type != "gpt2":
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :vocab].float()
        return F.cross_entropy(logits.reshape(-1, vocab), targets, ignore_index=IGNORE_INDEX, reduction="sum"), count
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.size(-1))
    # sliced to the real vocabulary, the matrix would have an odd number of rows and be cast anew for every
    # chunk (154 MB read for gpt2); whole, its rows are a multiple of 64 (pad_vocab) and it is cast once
    weight = model.get_output_embeddings().weight
    if torch.is_autocast_enabled(hidden.device.type):
        weight = weight.to(torch.get_autocast_dtype(hidden.device.type))
    total = 0
    for start in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[start:start + chunk], weight)[:, :vocab].float()
        total = total + F.cross_entropy(logits, targets[start:start + chunk], ignore_index=IGNORE_INDEX,
                                        reduction="sum")
    return total, count
