"""The train stage for task: causal_lm: the model as it trains (its pad token, and a check that the
training samples fit its context), what the Trainer gets (blocks without their attention mask, sdpa's
causal kernel), and the model card: what the model is, what it was trained on and how, how it scores
against its base model, and how to reproduce it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipeline.core.common import perplexity
from pipeline.core.config import Params, TrainConfig
from pipeline.core.loading import context_length
from pipeline.generation.fit import check_prompts_fit
from pipeline.training.callbacks import leave_classifier_curves_empty
from pipeline.training.card import lineage
from pipeline.training.model import causal_sdpa
from pipeline.training.model import prepare_model as prepare

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from huggingface_hub import ModelCardData
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def labels(made: dict, data_dir: Path) -> None:
    """A language model has no labels to read."""
    return None


def prepare_model(params: Params, base_dir: Path, tokenizer: PreTrainedTokenizerBase, made: dict,
                  names: list[str] | None) -> tuple[PreTrainedModel, int]:
    """The base model as it will train (pipeline.training.model.prepare_model), and its real vocabulary;
    the training samples' prompts are checked to leave room for the tokens they ask for."""
    t = params.train
    model, vocab = prepare(t, params.model.trust_remote_code, base_dir, tokenizer.pad_token_id)
    if t.samples.every:
        check_prompts_fit(tokenizer, list(t.samples.prompts), t.samples.max_new_tokens,
                          context_length(model.config), "train.samples")
    return model, vocab


def trainer_options(model: PreTrainedModel, blocks: DatasetDict, names: list[str] | None, params: Params,
                    attention: str) -> dict:
    """The Trainer's datasets; the model set on sdpa's causal kernel where attention is sdpa."""
    if attention == "sdpa":
        causal_sdpa(model)
    return {"train_dataset": trainer_blocks(blocks["train"]), "eval_dataset": trainer_blocks(blocks["validation"])}


def trainer_blocks(blocks: Dataset) -> Dataset:
    """The blocks as the Trainer gets them: torch tensors, which default_data_collator stacks (from Python
    lists it builds every batch anew), without their attention mask, which changes nothing of the loss
    (its padding is on the right, after every real token, and out of the loss) and would make transformers
    read every batch on the host (training.model.causal_sdpa)."""
    if "attention_mask" in blocks.column_names:
        blocks = blocks.remove_columns("attention_mask")
    return blocks.with_format("torch")


def best_metric(params: Params) -> str:
    """The best checkpoint is the one of the lowest validation loss."""
    return "loss"


def finish_live_log(live_dir: Path) -> None:
    leave_classifier_curves_empty(live_dir)


def card(params: Params, base: dict, data: dict, metrics: dict, inputs: dict[str, str], commit: str | None) -> str:
    """models/finetuned/README.md (the stage's interface)."""
    return model_card(params.train, params.seed, params.lr, base, data,
                      (metrics["base_eval_loss"], metrics["eval_loss"]), metrics, inputs, commit)


TEMPLATE = """---
{{ card_data }}
---

# {{ base_name }} fine-tuned on {{ dataset }}

A causal language model fine-tuned from {{ origin }}, {{ "{:,}".format(parameters) }} parameters, on `{{ dataset }}`
(train split `{{ train_split }}`{{ data_commit }}), with this repository's DVC pipeline.

```python
from transformers import pipeline

generate = pipeline("text-generation", model="models/finetuned")
print(generate("Once upon a time", max_new_tokens=40)[0]["generated_text"])
```

## Evaluation

Validation split, non-overlapping blocks of {{ block_size }} tokens, mean negative log-likelihood per
predicted token:

| model | loss | perplexity |
|---|---|---|
| base | {{ base_loss }} | {{ base_perplexity }} |
| fine-tuned | {{ loss }} | {{ perplexity }} |

Sliding-window perplexity, bits per byte and the test split are in `metrics/eval.json` of the same commit.

## Training

{{ training }} Its parameters, and the data's preprocessing:

```yaml
{{ parameters_yaml }}
```

## Intended use and limitations

Text generation and further fine-tuning in the domain of the training data. The model inherits the
limitations and biases of its base model and of its training text (see the base model's card): it produces
plausible-sounding text that can be false, and it can reproduce passages of its training data (the
pipeline's generate stage measures how much). Not for decisions about people, nor as a source of facts.

## Reproduce

Git commit: `{{ commit }}`. Inputs, as recorded in `dvc.lock`:

{{ inputs }}

Check out the commit and run `dvc repro` (or `dvc pull` for the cached outputs).
"""


def card_data(base: dict, source: dict, eval_loss: float | None, on_hub: bool) -> ModelCardData:
    """The card's metadata: library, task, the base model and dataset where they are on the Hub, and the
    validation perplexity and loss as a model-index."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset, config = source.get("dataset", "unknown"), source.get("config")
    place = dict(task_type="text-generation", task_name="Causal language modeling", dataset_type=dataset,
                 dataset_name=dataset + (f" ({config})" if config else ""), dataset_config=config,
                 dataset_split="validation")
    results = None if eval_loss is None else [
        EvalResult(**place, metric_type="perplexity", metric_value=round(perplexity(eval_loss), 4),
                   metric_name="Validation perplexity"),
        EvalResult(**place, metric_type="loss", metric_value=round(eval_loss, 6),
                   metric_name="Validation loss (nats/token)")]
    return ModelCardData(library_name="transformers", pipeline_tag="text-generation",
                         tags=["gpt2", "text-generation", "fine-tuned", "dvc"], model_name="finetuned",
                         base_model=base.get("name") if on_hub else None,
                         datasets=[dataset] if source.get("format") == "hub" else None, eval_results=results)


def model_card(train: TrainConfig, seed: int, lr: float, base: dict, data: dict, losses: tuple[float | None, ...],
               metrics: dict, inputs: dict[str, str], commit: str | None) -> str:
    """The card's text. `base` and `data` are the provenance of models/base and data/processed; `losses`
    the validation losses of the base and the fine-tuned model (mean NLL per predicted token)."""
    from huggingface_hub import ModelCard

    base_loss, loss = losses
    source, preprocess, made = data.get("source", {}), data.get("preprocess", {}), lineage(base, data, inputs, commit)
    origin = (f"a GPT-2 built from its config (from scratch), seed {base.get('seed')}" if base.get("from_scratch")
              else f"`{base.get('name')}` at revision `{base.get('revision')}` "
                   f"(commit `{base.get('resolved_commit')}`)")
    training = (f"{metrics.get('steps')} optimizer steps, {metrics.get('tokens_seen', 0):,} tokens, effective batch "
                f"{metrics.get('effective_batch_size')} blocks, {metrics.get('precision')}, "
                f"{metrics.get('trainable_parameters', 0):,} trainable parameters"
                + (" (LoRA adapters, merged into these weights; the adapter alone is in `adapter/`)."
                   if train.lora.enabled else "."))
    parameters = {"seed": seed, "lr": lr, "train": asdict(train), "data": data.get("records", {}),
                  "preprocess": preprocess}
    return str(ModelCard.from_template(
        card_data(base, source, loss, made.on_hub), template_str=TEMPLATE, base_name=base.get("name"),
        dataset=made.dataset,
        origin=origin, parameters=base.get("parameters", 0),
        data_commit=f", commit `{made.data_commit}`" if made.data_commit else "",
        train_split=data.get("records", {}).get("train_split"),
        block_size=preprocess.get("block_size"), base_loss=_loss(base_loss), base_perplexity=_perplexity(base_loss),
        loss=_loss(loss), perplexity=_perplexity(loss), training=training,
        parameters_yaml=yaml.safe_dump(parameters, sort_keys=False).strip(),
        commit=made.commit, inputs=made.inputs))


def _loss(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def _perplexity(loss: float | None) -> str:
    return f"{perplexity(loss):,.2f}" if loss is not None else "n/a"
