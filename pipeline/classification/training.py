"""The train stage's parts for task: classification: a pad token of the classifier's own, the loss weighed
by class where classify.class_weights asks for it, and the model card."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

import yaml

from pipeline.classification.data import pad_token_id
from pipeline.classification.metrics import class_weights
from pipeline.core.config import Params

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from transformers import PreTrainedTokenizerBase

PAD_TOKEN = "<|pad|>"


def add_pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id texts were padded with (classification.data.pad_token_id), given to a "<|pad|>" token of
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
print(classify("A text to label", top_k=None))
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


def classification_card(params: Params, base: dict, data: dict, metrics: dict, inputs: dict[str, str],
                        commit: str | None) -> str:
    """models/finetuned/README.md for a classifier: huggingface_hub's ModelCard with its metadata."""
    from huggingface_hub import ModelCard, ModelCardData

    labels, source = data.get("labels", []), data.get("source", {})
    dataset = source.get("dataset", "unknown") + (f" ({source['config']})" if source.get("config") else "")
    on_hub = not base.get("from_scratch") and base.get("resolved_commit") is not None
    card_data = ModelCardData(library_name="transformers", pipeline_tag="text-classification",
                              tags=["gpt2", "text-classification", "fine-tuned", "dvc"], model_name="finetuned",
                              base_model=base.get("name") if on_hub else None,
                              datasets=[source["dataset"]] if source.get("format") == "hub" else None)
    parameters = {"seed": params.seed, "lr": params.lr, "train": asdict(params.train),
                  "classify": asdict(params.classify), "preprocess": data.get("preprocess", {})}
    return str(ModelCard(CARD.format(
        card_data=card_data.to_yaml(), name="finetuned", base=base.get("name"), n=len(labels),
        labels=", ".join(labels), commit=f" (commit `{base['resolved_commit']}`)" if on_hub else "",
        dataset=dataset, data_commit=f" (commit `{source['resolved_commit']}`)" if source.get("resolved_commit")
        else "", block_size=data.get("preprocess", {}).get("block_size"),
        accuracy=_figure(metrics.get("eval_accuracy")), macro_f1=_figure(metrics.get("eval_macro_f1")),
        parameters=yaml.safe_dump(parameters, sort_keys=False).strip(), git=commit or "not in a git repository",
        inputs="\n".join(f"- `{path}`: md5 `{md5}`" for path, md5 in sorted(inputs.items()))
        or "- (not run through DVC: no dvc.lock entries)")))


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
