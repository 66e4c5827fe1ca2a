"""The train stage for task: classification: the model as it trains (a head over the data's labels, a pad
token of the classifier's own), what the Trainer gets (accuracy and macro-F1 at every evaluation, the
loss weighed by class where classify.class_weights asks for it), and the model card."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipeline.core.config import Params
from pipeline.core.loading import saved_labels
from pipeline.tasks.classification.metrics import class_weights, trainer_metrics
from pipeline.tasks.classification.preprocess import pad_token_id
from pipeline.training.card import lineage
from pipeline.training.model import prepare_model as prepare

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from datasets import DatasetDict
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PAD_TOKEN = "<|pad|>"


def labels(made: dict, data_dir: Path) -> list[str]:
    """The label names preprocess kept with the blocks, in id order."""
    return saved_labels(made, data_dir)


def prepare_model(params: Params, base_dir: Path, tokenizer: PreTrainedTokenizerBase, made: dict,
                  names: list[str] | None) -> tuple[PreTrainedModel, int]:
    """A sequence classifier over `names`, its head new (seeded: the same params, the same classifier), a
    pad token of its own; and its real vocabulary. The tokenizer, saved beside it, reads texts as preprocess
    cut and padded them (read_as_blocks)."""
    from transformers import set_seed

    set_seed(params.seed)  # the new head's initial weights
    model, vocab = prepare(params.train, params.model.trust_remote_code, base_dir, add_pad_token(tokenizer), names)
    read_as_blocks(tokenizer, made["preprocess"]["block_size"], made["preprocess"]["add_eos"],
                   made["classify"]["padding_side"])
    return model, vocab


def read_as_blocks(tokenizer: PreTrainedTokenizerBase, block_size: int, add_eos: bool, padding_side: str) -> None:
    """Keep how the classifier's texts were read in the tokenizer's own settings, which its saved config and
    tokenizer.json carry and transformers' text-classification pipeline honours: at most `block_size` tokens
    (model_max_length, with truncation=True), padded on `padding_side`, and EOS after each text where
    `add_eos` (its post-processor). The generate stage reads them back (generate.text_shape)."""
    from tokenizers.processors import TemplateProcessing

    tokenizer.model_max_length = tokenizer.init_kwargs["model_max_length"] = block_size
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = padding_side
    if add_eos:
        eos = tokenizer.eos_token
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"$A {eos}", special_tokens=[(eos, tokenizer.eos_token_id)])


def trainer_options(model: PreTrainedModel, blocks: DatasetDict, names: list[str] | None, params: Params,
                    attention: str) -> dict:
    """The Trainer's datasets, its accuracy and macro-F1 at every evaluation, and the weighted loss."""
    options: dict = {"train_dataset": blocks["train"].with_format("torch"),
                     "eval_dataset": blocks["validation"].with_format("torch"), "compute_metrics": trainer_metrics}
    if params.classify.class_weights == "balanced":
        seen = Counter(blocks["train"]["labels"])
        options["compute_loss_func"] = weighted_loss([seen.get(i, 0) for i in range(len(names))])
    return options


def best_metric(params: Params) -> str:
    """The best checkpoint is the one of classify.best_metric."""
    return params.classify.best_metric


def finish_live_log(live_dir: Path) -> None:
    """A classifier's live log has every curve dvc.yaml declares for it."""


def add_pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id texts were padded with (tasks.classification.preprocess.pad_token_id), given to a "<|pad|>" token of
    the tokenizer's when it has no pad token but EOS: GPT-2's classifier reads the last token that is not
    the pad token, so with pad = EOS a text ending in EOS would be read one token early."""
    pad = pad_token_id(tokenizer)
    if pad == len(tokenizer):
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return pad


def weighted_loss(counts: list[int]) -> Callable[..., torch.Tensor]:
    """compute_loss_func for the Trainer: cross-entropy with classify.class_weights: balanced, summed and
    divided by the batch's examples (over all accumulated micro-batches, as the Trainer counts them)."""
    weights = class_weights(counts)

    def loss(outputs: dict, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
             ) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        logits = outputs["logits"].float()
        w = torch.tensor(weights, device=logits.device)
        total = F.cross_entropy(logits, labels.to(logits.device), weight=w, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else labels.numel()
        return total / (count.to(total.device) if hasattr(count, "to") else count)

    return loss


CARD = """---
{card_data}
---

# {name}: a text classifier fine-tuned from {base}

GPT-2's sequence classification head over {n} labels ({labels}), fine-tuned from `{base}`{commit} on
`{dataset}`{data_commit}, with this repository's DVC pipeline. Each text is read up to {block_size} tokens;
the label is predicted from its last real token.

```python
from transformers import pipeline

classify = pipeline("text-classification", model="models/finetuned")
print(classify("A text to label", top_k=None, truncation=True))
```

## Evaluation

Validation split, at the end of training: accuracy {accuracy}, macro-F1 {macro_f1} (the evaluate stage's
`metrics/eval.json` has per-class figures, the confusion matrix and the baselines: the majority class and
the base model zero-shot).

## Training

```yaml
{parameters}
```

Git commit: `{git}`. Inputs, as recorded in `dvc.lock`:

{inputs}
"""


def card(params: Params, base: dict, data: dict, metrics: dict, inputs: dict[str, str], commit: str | None) -> str:
    """models/finetuned/README.md for a classifier: huggingface_hub's ModelCard with its metadata."""
    from huggingface_hub import ModelCard, ModelCardData

    names, source, made = data.get("labels", []), data.get("source", {}), lineage(base, data, inputs, commit)
    on_hub = made.on_hub
    card_data = ModelCardData(library_name="transformers", pipeline_tag="text-classification",
                              tags=["gpt2", "text-classification", "fine-tuned", "dvc"], model_name="finetuned",
                              base_model=base.get("name") if on_hub else None,
                              datasets=[source["dataset"]] if source.get("format") == "hub" else None)
    parameters = {"seed": params.seed, "lr": params.lr, "train": asdict(params.train),
                  "classify": asdict(params.classify), "preprocess": data.get("preprocess", {})}
    return str(ModelCard(CARD.format(
        card_data=card_data.to_yaml(), name="finetuned", base=base.get("name"), n=len(names),
        labels=", ".join(names), commit=f" (commit `{base['resolved_commit']}`)" if on_hub else "",
        dataset=made.dataset, data_commit=f" (commit `{made.data_commit}`)" if made.data_commit else "",
        block_size=data.get("preprocess", {}).get("block_size"),
        accuracy=_figure(metrics.get("eval_accuracy")), macro_f1=_figure(metrics.get("eval_macro_f1")),
        parameters=yaml.safe_dump(parameters, sort_keys=False).strip(), git=made.commit, inputs=made.inputs)))


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
