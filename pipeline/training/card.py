"""The model card (models/finetuned/README.md): huggingface_hub's ModelCard, its metadata and model-index
from ModelCardData, then what the model is, what it was trained on and how, how it scores against its
base model, and exactly how to reproduce it (git commit, the dvc.lock hashes of its inputs, the
training parameters and the data's preprocessing).

What the card says of the base model and the data comes from the provenance the earlier stages wrote
(models/base/provenance.json, data/processed/provenance.json), so the train stage needs no model or
data params of its own."""

from __future__ import annotations

import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipeline.core.common import perplexity
from pipeline.core.config import TrainConfig

if TYPE_CHECKING:
    from huggingface_hub import ModelCardData

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


def git_commit() -> str | None:
    """HEAD, with "-dirty" when the work tree has changes; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def lock_hashes(paths: list[str], lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """The md5 that dvc.lock records for each of `paths` (outputs of the stages before this one)."""
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    found = {}
    for stage in stages.values():
        for out in stage.get("outs", []):
            if out.get("path") in paths and "md5" in out:
                found[out["path"]] = out["md5"]
    return found


def card_data(base: dict, source: dict, eval_loss: float | None) -> ModelCardData:
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
    on_hub = not base.get("from_scratch") and base.get("resolved_commit") is not None
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
    source, preprocess = data.get("source", {}), data.get("preprocess", {})
    dataset = source.get("dataset", "unknown") + (f" ({source['config']})" if source.get("config") else "")
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
        card_data(base, source, loss), template_str=TEMPLATE, base_name=base.get("name"), dataset=dataset,
        origin=origin, parameters=base.get("parameters", 0),
        data_commit=f", commit `{source['resolved_commit']}`" if source.get("resolved_commit") else "",
        train_split=data.get("records", {}).get("train_split"),
        block_size=preprocess.get("block_size"), base_loss=_loss(base_loss), base_perplexity=_perplexity(base_loss),
        loss=_loss(loss), perplexity=_perplexity(loss), training=training,
        parameters_yaml=yaml.safe_dump(parameters, sort_keys=False).strip(),
        commit=commit or "not in a git repository",
        inputs="\n".join(f"- `{path}`: md5 `{md5}`" for path, md5 in sorted(inputs.items()))
        or "- (not run through DVC: no dvc.lock entries)"))


def _loss(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def _perplexity(loss: float | None) -> str:
    return f"{perplexity(loss):,.2f}" if loss is not None else "n/a"
