"""The model card (models/finetuned/README.md) in the Hugging Face format: YAML metadata, then what
the model is, what it was trained on and how, how it scores against its base model, and exactly how
to reproduce it (git commit, the dvc.lock hashes of its inputs, every parameter)."""

from __future__ import annotations

import math
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Params


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


def _perplexity(loss: float | None) -> str:
    return f"{math.exp(loss):,.2f}" if loss is not None else "n/a"


def model_card(params: Params, base: dict, base_eval_loss: float | None, eval_loss: float | None, metrics: dict,
               inputs: dict[str, str], commit: str | None) -> str:
    """The card's text. `base` is models/base/provenance.json; the losses are the validation losses
    of the base and the fine-tuned model (mean NLL per predicted token over the validation blocks)."""
    hub_model = not params.model.from_scratch and not Path(params.model.name).exists()
    hub_data = "/" in params.data.dataset and not Path(params.data.dataset).exists()
    dataset = params.data.dataset + (f" ({params.data.config})" if params.data.config else "")
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                            "tags": ["gpt2", "text-generation", "fine-tuned", "dvc"]}
    if hub_model:
        meta["base_model"] = params.model.name
    if hub_data:
        meta["datasets"] = [params.data.dataset]
    if eval_loss is not None:
        meta["model-index"] = [{"name": "finetuned", "results": [{
            "task": {"type": "text-generation", "name": "Causal language modeling"},
            "dataset": {"name": dataset, "type": params.data.dataset, "split": "validation",
                        **({"config": params.data.config} if params.data.config else {})},
            "metrics": [{"type": "perplexity", "value": round(math.exp(eval_loss), 4), "name": "Validation perplexity"},
                        {"type": "loss", "value": round(eval_loss, 6), "name": "Validation loss (nats/token)"}]}]}]
    origin = (f"a GPT-2 built from its config (from scratch), seed {params.seed}"
              if params.model.from_scratch else
              f"`{params.model.name}` at revision `{params.model.revision}` (commit `{base.get('resolved_commit')}`)")
    trained = {"seed": params.seed, "lr": params.lr, "model": asdict(params.model), "data": asdict(params.data),
               "preprocess": asdict(params.preprocess), "train": asdict(params.train)}
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {params.model.name} fine-tuned on {dataset}", "",
        f"A causal language model fine-tuned from {origin}, {base.get('parameters', 0):,} parameters, on "
        f"`{dataset}` (train split `{params.data.train_split}`), with this repository's DVC pipeline.", "",
        "```python", "from transformers import pipeline", "",
        'generate = pipeline("text-generation", model="models/finetuned")',
        'print(generate("Once upon a time", max_new_tokens=40)[0]["generated_text"])', "```", "",
        "## Evaluation", "",
        f"Validation split, non-overlapping blocks of {params.preprocess.block_size} tokens, mean negative "
        "log-likelihood per predicted token:", "",
        "| model | loss | perplexity |", "|---|---|---|",
        f"| base | {base_eval_loss if base_eval_loss is None else f'{base_eval_loss:.4f}'} | "
        f"{_perplexity(base_eval_loss)} |",
        f"| fine-tuned | {eval_loss if eval_loss is None else f'{eval_loss:.4f}'} | {_perplexity(eval_loss)} |", "",
        "Sliding-window perplexity, bits per byte and the test split are in `metrics/eval.json` of the same "
        "commit (`dvc metrics show`).", "",
        "## Training", "",
        f"{metrics.get('steps')} optimizer steps, {metrics.get('tokens_seen', 0):,} tokens, effective batch "
        f"{metrics.get('effective_batch_size')} blocks, {metrics.get('precision')}, "
        f"{metrics.get('trainable_parameters', 0):,} trainable parameters"
        + (" (LoRA adapters, merged into these weights; the adapter alone is in `adapter/`)"
           if params.train.lora.enabled else "") + ". Every parameter:", "",
        "```yaml", yaml.safe_dump(trained, sort_keys=False).strip(), "```", "",
        "## Intended use and limitations", "",
        "Text generation and further fine-tuning in the domain of the training data. The model inherits the "
        "limitations and biases of its base model and of its training text (see the base model's card): it "
        "produces plausible-sounding text that can be false, and it can reproduce passages of its training "
        "data (the pipeline's generate stage measures how much). Not for decisions about people, nor as a "
        "source of facts.", "",
        "## Reproduce", "",
        f"Git commit: `{commit or 'not in a git repository'}`. Inputs, as recorded in `dvc.lock`:", "",
        *([f"- `{path}`: md5 `{md5}`" for path, md5 in sorted(inputs.items())] or
          ["- (not run through DVC: no dvc.lock entries)"]), "",
        "Check out the commit and run `dvc repro` (or `dvc pull` for the cached outputs).", "",
    ]
    return "\n".join(lines)
