"""Typed view of params.yaml: one frozen dataclass per section, mirroring the file one to one.

This is the only module that knows the YAML layout. Loading rejects unknown keys and wrong
types by their dotted name, coerces the numeric strings PyYAML produces for YAML 1.1
(`lr: 5e-4` reads as the string "5e-4"), and checks ranges and cross-field rules in one place
(`Params.check`). Every field carries its help text; `python -m pipeline.config --help-params`
prints them all.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import operator
import os
import re
import shlex
import shutil
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import click
import yaml

from pipeline.common import PipelineError, params_option, stage_command

PARAMS_FILE = Path("params.yaml")
# Local inputs live where dvc.yaml declares them as dependencies, so an edit re-runs what it affects and
# every experiment commit records them: datasets, models and tokenizers of the download stage, and the
# generate stage's prompt files.
INPUTS = Path("data/input")
PROMPTS = Path("data/prompts")


def opt(default: Any, help: str, **bounds: float) -> Any:
    """A dataclass field with help text and optional numeric bounds (ge, gt, le, lt)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **bounds})
    return field(default=default, metadata={"help": help, **bounds})


@dataclass(frozen=True)
class ModelConfig:
    name: str = opt("gpt2", "Hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, any causal LM) or a local directory "
                            "saved with save_pretrained. Ignored for weights when from_scratch is true.")
    revision: str = opt("main", "Hub revision (branch, tag or commit) of the model and tokenizer; the resolved "
                                "commit is recorded in models/base/provenance.json.")
    tokenizer: str | None = opt(None, "Tokenizer Hub id or local directory; null means the same as name.")
    from_scratch: bool = opt(False, "Build a fresh GPT-2 from GPT2Config() + config_overrides (seeded) instead "
                                    "of loading pretrained weights, as run_clm's --config_overrides.")
    config_overrides: dict[str, Any] = opt({}, "GPT2Config fields for from_scratch, e.g. {n_layer: 4, n_embd: 128, "
                                               "n_head: 4, n_positions: 256}.")
    trust_remote_code: bool = opt(False, "Allow model code from the Hub to run. Off unless you trust the repo.")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = opt("Salesforce/wikitext", "Hub dataset id; a local .txt/.jsonl/.json/.csv/.tsv/.parquet file, "
                                              "directory or glob; or an http(s) URL of a text or JSONL file.")
    config: str | None = opt("wikitext-2-raw-v1", "Hub dataset config name (null if it has none).")
    revision: str | None = opt(None, "Hub dataset revision (branch, tag or commit); null means the default branch. "
                                     "The resolved commit is recorded in data/raw/provenance.json.")
    sha256: str | None = opt(None, "For a URL: the file's expected SHA-256; a mismatch stops download. Without it "
                                   "the digest is computed and recorded.")
    streaming: bool = opt(False, "Stream the source instead of downloading it whole first: rows are written to "
                                 "data/raw as they arrive, so the corpus never has to fit in memory (it still has "
                                 "to fit on disk).")
    max_samples: int | None = opt(None, "Keep only the first N documents of each split (debug subsets, as "
                                        "run_clm's max_train_samples). null: all.", ge=1)
    encoding_errors: Literal["strict", "replace", "ignore"] = opt(
        "strict", "Local files that are not valid UTF-8: strict stops, naming the file and byte offset; replace "
                  "puts U+FFFD in place of bad bytes; ignore drops them.")
    train_split: str = opt("train", "Split used for training.")
    validation_split: str | None = opt("validation", "The dataset's own validation split, used when it exists; "
                                                     "otherwise preprocess.val_fraction is split off train.")
    text_column: str = opt("text", "Column holding the text (when no template, dialogue or prompt/response "
                                   "template is set).")
    txt_sample_by: Literal["document", "paragraph", "line"] = opt(
        "document", "For local .txt files: one document per file, per blank-line paragraph, or per line.")
    template: str | None = opt(None, "Turn each record into text with this format string over its fields, e.g. "
                                     "\"Title: {title}\\nIngredients: {ingredients}\\nDirections: {directions}\" "
                                     "(list fields are joined with \", \").")
    dialogue_column: str | None = opt(None, "A list-of-turns field rendered as \"Speaker: text\" lines: turns as "
                                            "strings (speakers alternate), dicts with speaker/role and text/content/"
                                            "utterance, or a dict of lists (schema-guided dialogue).")
    speakers: list[str] = opt(["User", "Assistant"], "Speaker labels for string turns and numeric speaker ids.")
    use_chat_template: bool = opt(False, "Render dialogues with the tokenizer's chat template (an error if it has "
                                         "none; GPT-2's has none).")
    prompt_template: str | None = opt(None, "Supervised fine-tuning: the prompt part of each record (format "
                                            "string); its tokens get labels -100, so the loss is on the response.")
    response_template: str | None = opt(None, "Supervised fine-tuning: the response part (format string).")


@dataclass(frozen=True)
class PreprocessConfig:
    block_size: int = opt(1024, "Tokens per block (the maximum length in pad mode); at most the model's "
                                "n_positions.", ge=2)
    mode: Literal["pack", "pad"] = opt(
        "pack", "pack: concatenate documents (EOS between) and cut into full blocks; pad: one document per block, "
                "truncated to block_size and padded, padding out of the loss and the attention mask.")
    add_eos: bool = opt(True, "Append the EOS token after every document, so the model learns where texts end. "
                              "Off for corpora whose rows are lines of one stream.")
    remainder: Literal["drop", "pad"] = opt(
        "drop", "pack mode, the tail shorter than block_size: drop it (run_clm) or pad it with EOS, its padding "
                "excluded from the loss (labels -100).")
    val_fraction: float = opt(0.05, "Fraction of documents split off (seeded) for validation when the dataset "
                                    "has no validation split.", gt=0.0, lt=1.0)
    strip: bool = opt(False, "Strip leading and trailing whitespace from every document.")
    min_chars: int = opt(0, "Drop documents shorter than this many characters (after strip); 1 drops empty ones.",
                         ge=0)
    dedup: bool = opt(False, "Drop exact duplicate documents within each split, and validation/test documents "
                             "that also appear in train (counts in metrics/data.json).")
    num_proc: int = opt(1, "Processes for tokenization (datasets.map num_proc).", ge=1)
    batch_size: int = opt(1000, "Documents per datasets.map batch.", ge=1)


TRACKERS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "flyte", "kubeflow", "mlflow", "neptune",
            "swanlab", "tensorboard", "trackio", "wandb")  # the Trainer's report_to, dvclive aside
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd")


@dataclass(frozen=True)
class FreezeConfig:
    embeddings: bool = opt(False, "Freeze the token and position embeddings (GPT-2 ties the output layer to them, "
                                  "so it is frozen too).")
    layers: int = opt(0, "Freeze the first N transformer blocks.", ge=0)


@dataclass(frozen=True)
class SamplesConfig:
    every: int = opt(0, "Every N optimizer steps, continue these prompts with the model being trained and append "
                        "the samples to dvclive/samples.md (gpt-2-simple's sample_every). 0: off. The random "
                        "state is put back after sampling, so the training is the same with or without.", ge=0)
    prompts: list[str] = opt([""], "Prompts to continue; \"\" starts from the document boundary (EOS).")
    max_new_tokens: int = opt(48, "Tokens per sample.", ge=1)


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = opt(False, "Train peft LoRA adapters instead of all weights. models/finetuned/ gets the merged "
                               "plain model (loads without peft) and adapter/ the adapter alone.")
    r: int = opt(8, "Adapter rank.", ge=1)
    alpha: int = opt(16, "Adapter scale numerator (the update is scaled by alpha / r).", ge=1)
    dropout: float = opt(0.05, "Dropout on the adapter input.", ge=0.0, lt=1.0)
    target_modules: list[str] = opt(["c_attn", "c_proj", "c_fc"], "Modules that get adapters (GPT-2: c_attn, "
                                                                  "c_proj, c_fc; other models: e.g. q_proj, v_proj).")


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = opt(3.0, "Training epochs (num_train_epochs); may be fractional.", gt=0.0)
    max_steps: int = opt(-1, "If > 0, train exactly this many optimizer steps and ignore epochs.", ge=-1)
    per_device_train_batch_size: int = opt(8, "Blocks per device per forward pass.", ge=1)
    per_device_eval_batch_size: int = opt(8, "Blocks per device per forward pass in in-training evaluation.", ge=1)
    gradient_accumulation_steps: int = opt(1, "Forward passes per optimizer step. Effective batch = per-device "
                                              "batch x accumulation x devices.", ge=1)
    optimizer: Literal[OPTIMIZERS] = opt("adamw_torch_fused", "Trainer optim name; adamw_torch_fused is AdamW "  # type: ignore[valid-type]
                                                              "with torch's fused kernel (CUDA and CPU).")
    lr_scheduler: Literal[SCHEDULERS] = opt("linear", "Learning-rate schedule (Trainer lr_scheduler_type).")  # type: ignore[valid-type]
    warmup_steps: int = opt(0, "Linear warmup steps.", ge=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", ge=0.0)
    adam_beta1: float = opt(0.9, "Adam beta1.", ge=0.0, lt=1.0)
    adam_beta2: float = opt(0.999, "Adam beta2.", ge=0.0, lt=1.0)
    adam_epsilon: float = opt(1e-8, "Adam epsilon.", gt=0.0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).", ge=0.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "auto: bf16 where the device runs it natively (CUDA >= 8.0, CPU with AMX/AVX512-BF16), fp16 "
                "with loss scaling on older GPUs, else fp32. An explicit choice the device cannot run is an error.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = opt(
        "auto", "auto: on CUDA flash_attention_2 where the flash-attn package is installed (bf16/fp16), else sdpa, "
                "nothing measured; on a CPU sdpa and eager timed on one block, the faster kept. flash_attention_2 "
                "needs CUDA and flash-attn.")
    torch_compile: Literal["auto", True, False] = opt(
        "auto", "torch.compile the model and its loss. auto: on CUDA for runs of at least 5M tokens, where the "
                "compile time is won back; off on CPU, where it made GPT-2 slower.")
    dropout: float | None = opt(None, "Dropout of the model for fine-tuning (every dropout field of its config: "
                                      "GPT-2's resid_pdrop, embd_pdrop, attn_pdrop); null keeps the model's own "
                                      "(0.1 for GPT-2). 0 trains faster and often fits small data worse.",
                                ge=0.0, lt=1.0)
    pad_vocab_multiple_of: int = opt(64, "Pad the embedding/output matrix to a multiple of this (64: GPT-2's "
                                         "50257 -> 50304) for faster matmuls; the padding takes no part in the "
                                         "loss and is trimmed before saving. 0: off.", ge=0)
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass: less memory, ~30% "
                                              "more compute.")
    freeze: FreezeConfig = opt(FreezeConfig(), "Transfer learning: parts of the base model kept fixed.")
    lora: LoraConfig = opt(LoraConfig(), "Parameter-efficient fine-tuning with peft LoRA.")
    memory_preflight: bool = opt(True, "Estimate peak memory before training (calibrated per device, see "
                                       "pipeline/memory.py) and stop, with the batch size that fits, if it exceeds "
                                       "90% of the free memory.")
    logging_steps: int = opt(10, "Log training loss, learning rate and throughput every N optimizer steps.", ge=1)
    eval_steps: int = opt(200, "Evaluate on the validation blocks every N steps (0: only at the end).", ge=0)
    save_steps: int = opt(200, "Write a resumable checkpoint every N steps.", ge=1)
    save_total_limit: int = opt(2, "Checkpoints kept on disk (oldest deleted).", ge=1)
    load_best_model_at_end: bool = opt(False, "Keep the checkpoint with the lowest validation loss instead of the "
                                              "last (needs eval_steps > 0 and save_steps a multiple of it).")
    early_stopping_patience: int = opt(0, "Stop after this many evaluations without improvement (0: off; needs "
                                          "load_best_model_at_end).", ge=0)
    dataloader_num_workers: int = opt(0, "DataLoader worker processes.", ge=0)
    report_to: list[str] = opt([], "Experiment trackers beside dvclive (always on), through the Trainer's "
                                   "integrations: tensorboard, wandb, mlflow, comet_ml, clearml, neptune, ... Each "
                                   "needs its package installed (pip install tensorboard).")
    samples: SamplesConfig = opt(SamplesConfig(), "Samples during training, into dvclive/samples.md.")


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = opt(8, "Blocks (or windows) per forward pass when evaluating.", ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "Autocast precision of the forward passes (the loss is summed in fp32); auto as train.precision.")
    stride: int | None = opt(None, "Sliding-window perplexity: the window (block_size tokens) moves by this many "
                                   "tokens, so each token is scored once with at least block_size - stride tokens "
                                   "of context. null: block_size / 2.", ge=1)


@dataclass(frozen=True)
class GenerateConfig:
    prompts: list[str] = opt(["The meaning of life is"], "Prompts to continue.")
    prompts_file: str | None = opt(None, "More prompts: a text file (one per line) or JSONL (a \"prompt\" field "
                                         "per line), kept in data/prompts/ (the generate stage's dependency).")
    max_new_tokens: int = opt(64, "Tokens generated per sample.", ge=1)
    do_sample: bool = opt(True, "Sample (true) or greedy decode (false).")
    temperature: float = opt(0.8, "Sampling temperature.", gt=0.0)
    top_k: int = opt(50, "Keep the k most likely tokens (0 disables).", ge=0)
    top_p: float = opt(0.95, "Nucleus sampling mass.", gt=0.0, le=1.0)
    repetition_penalty: float = opt(1.0, "Penalise tokens already present (1.0: off; 1.2 is common).", gt=0.0)
    no_repeat_ngram_size: int = opt(0, "Never repeat an n-gram of this size (0: off).", ge=0)
    stop: list[str] = opt([], "Stop a sample at the first of these strings (it is cut there).")
    num_return_sequences: int = opt(2, "Samples per prompt.", ge=1)
    batch_size: int = opt(8, "Prompts per generate() call (left-padded, KV cache).", ge=1)
    compare_base: bool = opt(True, "Also sample the base model, shown side by side in samples.md.")
    seed: int = opt(1234, "Sampling seed; the same seed and prompts give the same samples.", ge=0)


@dataclass(frozen=True)
class Params:
    seed: int = opt(42, "One seed for model init (from scratch), data split, data order and dropout.", ge=0)
    lr: float = opt(5e-5, "Peak learning rate (top level so `dvc exp run -S lr=5e-4` works).", gt=0.0)
    model: ModelConfig = opt(ModelConfig(), "Base model and tokenizer.")
    data: DataConfig = opt(DataConfig(), "Raw dataset source.")
    preprocess: PreprocessConfig = opt(PreprocessConfig(), "Tokenize, add EOS, chunk and split.")
    train: TrainConfig = opt(TrainConfig(), "Fine-tuning hyperparameters (Hugging Face Trainer).")
    evaluate: EvaluateConfig = opt(EvaluateConfig(), "Base vs fine-tuned evaluation.")
    generate: GenerateConfig = opt(GenerateConfig(), "Sampling from the fine-tuned model.")

    def check(self) -> None:
        """Cross-field rules, all in one place."""
        self.check_inputs()
        overrides = self.model.config_overrides
        if overrides and not self.model.from_scratch:
            fail("model.config_overrides", "is only used with model.from_scratch: true; remove it or set from_scratch")
        n_embd, n_head, n_positions = (overrides.get(k) for k in ("n_embd", "n_head", "n_positions"))
        if n_embd and n_head and n_embd % n_head:
            fail("model.config_overrides", f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        if n_positions is not None and self.preprocess.block_size > n_positions:
            fail("preprocess.block_size", f"({self.preprocess.block_size}) exceeds model.config_overrides.n_positions "
                                          f"({n_positions}); lower block_size or raise n_positions")
        if self.train.warmup_steps and self.train.max_steps > 0 and self.train.warmup_steps > self.train.max_steps:
            fail("train.warmup_steps", f"({self.train.warmup_steps}) exceeds train.max_steps ({self.train.max_steps})")
        d = self.data
        if (d.prompt_template is None) != (d.response_template is None):
            fail("data.prompt_template", "and data.response_template go together (prompt/response fine-tuning); "
                                         "set both or neither")
        shapes = [name for name, on in (("data.template", d.template), ("data.dialogue_column", d.dialogue_column),
                                        ("data.prompt_template", d.prompt_template)) if on]
        if len(shapes) > 1:
            fail(shapes[1], f"conflicts with {shapes[0]}; records become text one way: set only one of them")
        t = self.train
        if t.load_best_model_at_end and (t.eval_steps == 0 or t.save_steps % t.eval_steps):
            fail("train.load_best_model_at_end", f"needs eval_steps > 0 and save_steps ({t.save_steps}) a multiple "
                                                 f"of eval_steps ({t.eval_steps})")
        if t.early_stopping_patience and not t.load_best_model_at_end:
            fail("train.early_stopping_patience", "needs train.load_best_model_at_end: true")
        trackers = sorted(set(t.report_to) - set(TRACKERS))
        if trackers:
            fail("train.report_to", f"does not know {trackers[0]!r}"
                                    f"{' (dvclive is always on)' if trackers[0] == 'dvclive' else ''}; use "
                                    f"{', '.join(TRACKERS)}")
        if t.lora.enabled and (t.freeze.embeddings or t.freeze.layers):
            fail("train.freeze", "does nothing with train.lora.enabled (LoRA keeps every base weight fixed); "
                                 "remove one of them")
        if self.evaluate.stride is not None and self.evaluate.stride > self.preprocess.block_size:
            fail("evaluate.stride", f"({self.evaluate.stride}) exceeds preprocess.block_size "
                                    f"({self.preprocess.block_size}); windows would skip tokens")
        if not self.generate.do_sample and self.generate.num_return_sequences > 1:
            fail("generate.num_return_sequences", "must be 1 when do_sample is false (greedy gives one answer)")


    def check_inputs(self) -> None:
        """Local files that change a result must be where dvc.yaml tracks them (INPUTS, PROMPTS)."""
        from pipeline.sources import is_local

        local = [("data.dataset", self.data.dataset), ("model.tokenizer", self.model.tokenizer)]
        if not self.model.from_scratch:
            local.append(("model.name", self.model.name))
        for key, value in local:
            if value and is_local(value) and not inside(value, INPUTS):
                fail(key, f"{shorten(value)} is a local path outside {INPUTS}/; move it into {INPUTS}/ (the download "
                          "stage's dependency, so DVC re-runs what it changes and versions it with every experiment)")
        prompts = self.generate.prompts_file
        if prompts and not inside(prompts, PROMPTS):
            fail("generate.prompts_file", f"{shorten(prompts)} is outside {PROMPTS}/; move it there (the generate "
                                          "stage's dependency, so editing it re-runs generate)")


def inside(path: str, folder: Path) -> bool:
    """Whether the relative `path` is `folder` or lies in it (no absolute paths, no way out with ..)."""
    parts = Path(path).parts
    return not Path(path).is_absolute() and ".." not in parts and Path(*parts[:len(folder.parts)]) == folder


def shorten(value: str, most: int = 80) -> str:
    """A value quoted for an error line, cut with an ellipsis."""
    return repr(value if len(value) <= most else value[:most] + "…")


def fail(key: str, problem: str) -> typing.NoReturn:
    """A params error: names the key and what to change."""
    raise PipelineError(f"params: {key} {problem} (fix it in params.yaml or your -S override)")


# --- loading -------------------------------------------------------------------------------------

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:
        if not any(value == a and type(value) is type(a) for a in args):  # 1 is not true, "true" is not True
            fail(key, f"must be one of {', '.join(str(a).lower() if isinstance(a, bool) else str(a) for a in args)}; "
                      f"got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(key, f"must be a mapping of {tp.__name__} keys; got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            fail(key, f"must be a list of strings; got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            fail(key, f"must be a mapping; got {value!r}")
        return {str(k): _scalar(v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            fail(key, f"must be true or false; got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str) or not value:
            fail(key, f"must be a non-empty string; got {value!r}")
        return value
    if tp in (int, float):
        return _number(value, tp, key)
    raise TypeError(f"unsupported type {tp} for {key}")  # a bug in this module, not user input


def _number(value: Any, tp: type, key: str) -> int | float:
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        value = float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        fail(key, f"must be a number; got {value!r}")
    if tp is int:
        if value != int(value):
            fail(key, f"must be a whole number; got {value!r}")
        return int(value)
    return float(value)


def _scalar(value: Any, key: str) -> Any:
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = _number(value, float, key)
        return int(number) if value.strip().lstrip("+-").isdigit() else number
    if not isinstance(value, (str, int, float, bool)):
        fail(key, f"must be a string, number or boolean; got {value!r}")
    return value


_BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def _check_bounds(value: Any, meta: dict, key: str) -> None:
    if value is None:  # an optional value left unset
        return
    for name, (within, word) in _BOUNDS.items():
        if name in meta and not within(value, meta[name]):
            fail(key, f"must be {word} {meta[name]}; got {value}")


def _build(cls: type, raw: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
        hint = f"did you mean {prefix}{close[0]}? " if close else ""
        fail(prefix + str(unknown[0]), f"is not a known parameter; {hint}known keys here: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = prefix + name
        values[name] = _coerce(raw[name], hints[name], key)
        _check_bounds(values[name], dict(f.metadata), key)
    return cls(**values)


def from_dict(raw: dict) -> Params:
    """Validate a params mapping (as read from YAML) into Params."""
    if not isinstance(raw, dict):
        raise PipelineError("params: the file must be a YAML mapping of sections (seed, lr, model, data, ...)")
    params = _build(Params, raw)
    params.check()
    return params


def read_yaml(path: Path | str) -> dict:
    """A YAML mapping from a file, or a one-line error."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"params: {path} not found; run from the project root or pass --params") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise PipelineError(f"params: {path} is not valid YAML{where}; fix the syntax") from None
    return raw or {}


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    return from_dict(read_yaml(path))


def merge(base: dict, override: dict) -> dict:
    """Deep-merge an override mapping (e.g. a recipe under examples/) onto a params mapping, as
    `dvc exp run -S` would; an empty mapping replaces (`config_overrides: {}` clears it)."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and v and isinstance(out.get(k), dict) else v
    return out


def set_args(override: dict, prefix: str = "") -> list[str]:
    """`-S key=value` arguments for `dvc exp run` equivalent to an override mapping (DVC parses each
    value as YAML)."""
    args = []
    for k, v in override.items():
        if isinstance(v, dict) and v:
            args += set_args(v, f"{prefix}{k}.")
        else:
            # One line per value: a string with newlines as a double-quoted scalar (JSON's is valid YAML)
            value = json.dumps(v) if isinstance(v, str) and "\n" in v else \
                yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
            args += ["-S", f"{prefix}{k}={value}"]
    return args


def documented(cls: type = Params, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every parameter."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            rows += documented(type(default), prefix + f.name + ".")
        else:
            rows.append((prefix + f.name, default, f.metadata["help"]))
    return rows


def help_lines() -> list[str]:
    return [f"{key} (default {default!r}): {text}" for key, default, text in documented()]


def markdown_table() -> str:
    """The README's parameter table."""
    rows = [f"| `{key}` | `{default!r}` | {text} |" for key, default, text in documented()]
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows])


def apply_set_params(params: dict, dvc_args: tuple[str, ...]) -> dict:
    """params with the `-S key=value` / `--set-param key=value` among dvc_args applied as DVC applies
    them (value parsed as YAML, set at its dotted key), so a recipe is checked with the user's flags."""
    out = merge(params, {})
    args = iter(dvc_args)
    for arg in args:
        if arg in ("-S", "--set-param"):
            assignment = next(args, "")
        elif arg.startswith("--set-param="):
            assignment = arg.split("=", 1)[1]
        else:
            continue
        key, sep, value = assignment.partition("=")
        if not sep:
            raise PipelineError(f"{arg} {assignment}: expected key=value, e.g. -S lr=5e-4")
        params_file, _, key = key.rpartition(":")  # DVC's -S other.yaml:key=value sets another file
        if params_file and Path(params_file).name != PARAMS_FILE.name:
            continue
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node[part] = dict(node[part]) if isinstance(node.get(part), dict) else {}
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    return out


def exp_run(recipe_args: list[str], dvc_args: tuple[str, ...]) -> None:
    """Replace this process with `dvc exp run <recipe -S args> <dvc_args>` (no shell in between, so
    templates and lists need no quoting, and a bad recipe never reaches DVC)."""
    beside_python = Path(sys.executable).parent / "dvc"  # .venv/bin/python run without activating .venv
    dvc = shutil.which("dvc") or (str(beside_python) if beside_python.exists() else None)
    if dvc is None:
        raise PipelineError("dvc is not on PATH; run `make setup` and `source .venv/bin/activate`")
    sys.stdout.flush()
    os.execv(dvc, ["dvc", "exp", "run", *recipe_args, *dvc_args])


@stage_command(pass_unknown_options=True)
@params_option
@click.option("--recipe", type=click.Path(exists=True, dir_okay=False),
              help="Check this override file against params and print it as `dvc exp run -S` arguments.")
@click.option("--run", "run_exp", is_flag=True,
              help="With --recipe: run `dvc exp run` with the recipe's -S arguments and DVC_ARGS.")
@click.option("--help-params", is_flag=True, help="Print every parameter with its default and help.")
@click.option("--markdown", is_flag=True, help="Print the parameter table of the README.")
@click.argument("dvc_args", nargs=-1, type=click.UNPROCESSED)
def main(params_path: str, recipe: str | None, run_exp: bool, help_params: bool, markdown: bool,
         dvc_args: tuple[str, ...]) -> None:
    """Validate params.yaml (and an optional recipe override), describe every parameter, or run a
    recipe as an experiment: `python -m pipeline.config --recipe F --run [-S key=value ...]`."""
    if (run_exp or dvc_args) and not recipe:
        raise PipelineError("--run and dvc arguments need --recipe FILE; without a recipe run `dvc exp run` itself")
    if dvc_args and not run_exp:
        raise PipelineError(f"unexpected arguments {' '.join(dvc_args)}; to pass them to dvc exp run, add --run")
    if help_params:
        click.echo("\n".join(help_lines()))
    elif markdown:
        click.echo(markdown_table())
    elif recipe:
        override = read_yaml(recipe)
        from_dict(apply_set_params(merge(read_yaml(params_path), override), dvc_args))
        if run_exp:
            exp_run(set_args(override), dvc_args)
        click.echo(" ".join(shlex.quote(arg) for arg in set_args(override)))
    else:
        load_params(params_path)
        click.echo(f"{params_path}: ok", err=True)


if __name__ == "__main__":
    sys.exit(main())
