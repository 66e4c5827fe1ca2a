"""The schema of params.yaml: one frozen pydantic dataclass per section, mirroring the file one to one,
each field with its type, bounds and help text. No values: params.yaml is the one source of them, so
every field is required. Reading and checking a params file: pipeline.core.params.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, StrictBool, StringConstraints
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _no_bool(value: Any) -> Any:
    """YAML's true is not the number 1."""
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "must be a number")
    return value


def _auto_or_bool(value: Any) -> Any:
    if value != "auto" and not isinstance(value, bool):
        raise PydanticCustomError("choice", "must be one of auto, true, false")
    return value


def _scalars(value: Any) -> Any:
    """config_overrides: YAML scalars (null: the config's own default), numeric strings read as numbers."""
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if isinstance(item, str) and _NUMBER.match(item.strip()):
            item = int(item) if item.strip().lstrip("+-").isdigit() else float(item)
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            raise PydanticCustomError("scalar", "values must be strings, numbers, booleans or null")
        out[str(key)] = item
    return out


FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32: torch computes in it, or narrower


def _representable(value: float) -> float:
    """A number the code below can compute with: 0, or at least float32's smallest normal in size
    (smaller ones are subnormal: they divide into inf and NaN, or compute as 0)."""
    if value != 0 and abs(value) < FLOAT32_TINY:
        raise PydanticCustomError("tiny_number", "must be 0 or at least 1.2e-38 in size (float32, which torch "
                                                 "computes in, holds nothing smaller)")
    return value


Whole = Annotated[int, BeforeValidator(_no_bool)]
Number = Annotated[float, BeforeValidator(_no_bool), AfterValidator(_representable)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=1000)]  # ids, paths, names, revisions
LongText = Annotated[str, StringConstraints(min_length=1, max_length=100_000)]  # templates
Prompt = Annotated[str, StringConstraints(max_length=100_000)]  # "": from the document boundary
Texts = Annotated[list[Text], Field(max_length=1000)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$")]
Prompts = Annotated[list[Prompt], Field(max_length=10_000)]
# every step decodes each sample's last 4 x 200 tokens and looks for every stop string in them: bounded work
Stops = Annotated[list[Annotated[str, StringConstraints(min_length=1, max_length=200)]], Field(max_length=64)]
AutoOrBool = Annotated[Literal["auto", True, False], BeforeValidator(_auto_or_bool)]
Overrides = Annotated[dict[str, Any], BeforeValidator(_scalars)]


def doc(help: str, **bounds: float) -> Any:
    """A required field with its help text and numeric bounds (ge, gt, le, lt)."""
    return Field(description=help, **bounds)


# Ceilings: every count has one, so a slip of the keyboard (an extra three zeros) is refused at load time
# instead of hanging, starting thousands of processes or dying in the allocator. The real limits (the
# model's positions and layers, the machine's cores, memory) are checked where they are known.
SEED_MAX = 2**32 - 1  # numpy's seed range, which the Trainer's set_seed uses
STEPS_MAX = 10**9
BATCH_MAX = 2**16
PROCESSES_MAX = 1024
TOKENS_MAX = 2**20


TRACKERS = ("azure_ml", "clearml", "codecarbon", "comet_ml", "dagshub", "flyte", "kubeflow", "mlflow", "neptune",
            "swanlab", "tensorboard", "trackio", "wandb")  # the Trainer's report_to, dvclive aside
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd")


@dataclass(frozen=True, config=STRICT)
class ModelConfig:
    name: Text = doc(
        "Hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl, any causal LM) or a local directory saved with "
        "save_pretrained. Ignored for weights when from_scratch is true.")
    revision: Text = doc(
        "Hub revision (branch, tag or commit) of the model and tokenizer; the resolved commit is recorded in "
        "models/base/provenance.json.")
    tokenizer: Text | None = doc("Tokenizer Hub id or local directory; null means the same as name.")
    from_scratch: StrictBool = doc(
        "Build a fresh GPT-2 from GPT2Config() + config_overrides (seeded) instead of loading pretrained weights,"
        " as run_clm's --config_overrides.")
    config_overrides: Overrides = doc(
        "GPT2Config fields for from_scratch, e.g. {n_layer: 4, n_embd: 128, n_head: 4, n_positions: 256}.")
    trust_remote_code: StrictBool = doc("Allow model code from the Hub to run. Off unless you trust the repo.")


@dataclass(frozen=True, config=STRICT)
class DataConfig:
    dataset: Text = doc(
        "Hub dataset id; a local .txt/.jsonl/.json/.csv/.tsv/.parquet file, directory or glob; or an http(s) URL "
        "of a text or JSONL file.")
    config: Text | None = doc("Hub dataset config name (null if it has none).")
    revision: Text | None = doc(
        "Hub dataset revision (branch, tag or commit); null means the default branch. The resolved commit is "
        "recorded in data/raw/provenance.json.")
    sha256: Sha256 | None = doc(
        "For a URL: the file's expected SHA-256; a mismatch stops download. Without it the digest is computed and"
        " recorded.")
    streaming: StrictBool = doc(
        "Stream the source instead of downloading it whole first: rows are written to data/raw as they arrive, so"
        " the corpus never has to fit in memory (it still has to fit on disk).")
    max_samples: Whole | None = doc(
        "Keep only the first N documents of each split (debug subsets, as run_clm's max_train_samples). null: "
        "all.", ge=1, le=STEPS_MAX)
    encoding_errors: Literal["strict", "replace", "ignore"] = doc(
        "Local files that are not valid UTF-8: strict stops, naming the file and byte offset; replace puts U+FFFD"
        " in place of bad bytes; ignore drops them.")
    train_split: Text = doc("Split used for training.")
    validation_split: Text | None = doc(
        "The dataset's own validation split, used when it exists; otherwise preprocess.val_fraction is split off "
        "train.")
    text_column: Text = doc("Column holding the text (when no template, dialogue or prompt/response template is set).")
    txt_sample_by: Literal["document", "paragraph", "line"] = doc(
        "For local .txt files: one document per file, per blank-line paragraph, or per line.")
    template: LongText | None = doc(
        "Turn each record into text with this format string over its fields, e.g. \"Title: {title}\\nIngredients: "
        "{ingredients}\\nDirections: {directions}\" (list fields are joined with \", \").")
    dialogue_column: Text | None = doc(
        "A list-of-turns field rendered as \"Speaker: text\" lines: turns as strings (speakers alternate), dicts "
        "with speaker/role and text/content/utterance, or a dict of lists (schema-guided dialogue).")
    speakers: Texts = doc("Speaker labels for string turns and numeric speaker ids.")
    use_chat_template: StrictBool = doc(
        "Render dialogues with the tokenizer's chat template (an error if it has none; GPT-2's has none).")
    prompt_template: LongText | None = doc(
        "Supervised fine-tuning: the prompt part of each record (format string); its tokens get labels -100, so "
        "the loss is on the response.")
    response_template: LongText | None = doc("Supervised fine-tuning: the response part (format string).")


@dataclass(frozen=True, config=STRICT)
class PreprocessConfig:
    block_size: Whole = doc("Tokens per block (the maximum length in pad mode); at most the model's n_positions.", ge=2,
                            le=TOKENS_MAX)
    mode: Literal["pack", "pad"] = doc(
        "pack: concatenate documents (EOS between) and cut into full blocks; pad: one document per block, "
        "truncated to block_size and padded, padding out of the loss and the attention mask.")
    add_eos: StrictBool = doc(
        "Append the EOS token after every document, so the model learns where texts end. Off for corpora whose "
        "rows are lines of one stream.")
    remainder: Literal["drop", "pad"] = doc(
        "pack mode, the tail shorter than block_size: drop it (run_clm) or pad it with EOS, its padding excluded "
        "from the loss (labels -100).")
    val_fraction: Number = doc(
        "Fraction of documents split off (seeded) for validation when the dataset has no validation split.",
        gt=0.0, lt=1.0)
    bad_records: Literal["drop", "refuse"] = doc(
        "Records whose text field is missing or null, or not text (a number, list, mapping or bytes; a template "
        "field that is a mapping): drop them, counted per reason in metrics/data.json, or refuse, naming the first.")
    strip: StrictBool = doc("Strip leading and trailing whitespace from every document.")
    min_chars: Whole = doc("Drop documents shorter than this many characters (after strip); 1 drops empty ones.", ge=0,
                           le=STEPS_MAX)
    dedup: StrictBool = doc(
        "Drop exact duplicate documents within each split, and validation/test documents that also appear in "
        "train (counts in metrics/data.json).")
    num_proc: Whole = doc("Processes for tokenization (datasets.map num_proc), at most the machine's CPU cores.", ge=1,
                          le=PROCESSES_MAX)
    batch_size: Whole = doc("Documents per datasets.map batch.", ge=1, le=10**6)


@dataclass(frozen=True, config=STRICT)
class FreezeConfig:
    embeddings: StrictBool = doc(
        "Freeze the token and position embeddings (GPT-2 ties the output layer to them, so it is frozen too).")
    layers: Whole = doc("Freeze the first N transformer blocks (at most the model's).", ge=0, le=10_000)


@dataclass(frozen=True, config=STRICT)
class SamplesConfig:
    every: Whole = doc(
        "Every N optimizer steps, continue these prompts with the model being trained and append the samples to "
        "dvclive/samples.md (gpt-2-simple's sample_every). 0: off. The random state is put back after sampling, "
        "so the training is the same with or without.", ge=0, le=STEPS_MAX)
    prompts: Annotated[list[Prompt], Field(max_length=100)] = doc(
        "Prompts to continue; \"\" starts from the document boundary (EOS).")
    max_new_tokens: Whole = doc("Tokens per sample (the prompt and these within the model's positions).", ge=1,
                                le=TOKENS_MAX)


@dataclass(frozen=True, config=STRICT)
class LoraSettings:
    enabled: StrictBool = doc(
        "Train peft LoRA adapters instead of all weights. models/finetuned/ gets the merged plain model (loads "
        "without peft) and adapter/ the adapter alone.")
    r: Whole = doc("Adapter rank (below the width of the layers it adapts).", ge=1, le=4096)
    alpha: Whole = doc("Adapter scale numerator (the update is scaled by alpha / r).", ge=1, le=2**16)
    dropout: Number = doc("Dropout on the adapter input.", ge=0.0, lt=1.0)
    target_modules: Texts = doc(
        "Modules that get adapters (GPT-2: c_attn, c_proj, c_fc; other models: e.g. q_proj, v_proj).")


@dataclass(frozen=True, config=STRICT)
class TrainConfig:
    num_train_epochs: Number = doc("Training epochs; may be fractional.", gt=0.0, le=10_000)
    max_steps: Whole = doc("If > 0, train exactly this many optimizer steps and ignore num_train_epochs.", ge=-1,
                           le=STEPS_MAX)
    per_device_train_batch_size: Whole = doc("Blocks per device per forward pass.", ge=1, le=BATCH_MAX)
    per_device_eval_batch_size: Whole = doc("Blocks per device per forward pass in in-training evaluation.", ge=1,
                                            le=BATCH_MAX)
    gradient_accumulation_steps: Whole = doc(
        "Forward passes per optimizer step. Effective batch = per-device batch x accumulation x devices (at most "
        "the training blocks).", ge=1, le=BATCH_MAX)
    optim: Literal[OPTIMIZERS] = doc(
        "The optimizer; adamw_torch_fused is AdamW with torch's fused kernel (CUDA and CPU).")
    lr_scheduler_type: Literal[SCHEDULERS] = doc("Learning-rate schedule.")  # type: ignore[valid-type]
    warmup_steps: Whole = doc("Linear warmup steps (at most the planned steps).", ge=0, le=STEPS_MAX)
    weight_decay: Number = doc("AdamW weight decay.", ge=0.0, le=1.0)
    adam_beta1: Number = doc("Adam beta1.", ge=0.0, lt=1.0)
    adam_beta2: Number = doc("Adam beta2.", ge=0.0, lt=1.0)
    adam_epsilon: Number = doc("Adam epsilon.", gt=0.0, le=1.0)
    max_grad_norm: Number = doc("Gradient clipping norm (0 disables).", ge=0.0, le=10_000)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc(
        "auto: bf16 where the device runs it natively (CUDA >= 8.0, CPU with AMX/AVX512-BF16), fp16 with loss "
        "scaling on older GPUs, else fp32. An explicit choice the device cannot run is an error.")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = doc(
        "auto: on CUDA flash_attention_2 where the flash-attn package is installed (bf16/fp16), else sdpa, "
        "nothing measured; on a CPU sdpa and eager timed on one block, the faster kept. flash-attn is not in "
        "requirements.lock or the image: there sdpa runs, and its own flash kernel (PyTorch's FlashAttention-2: "
        "bf16/fp16, compute capability >= 8.0, no padding mask) serves GPT-2. flash_attention_2 needs CUDA and "
        "flash-attn.")
    torch_compile: AutoOrBool = doc(
        "torch.compile the model and its loss. auto: on CUDA for runs of at least 5M tokens, where the compile "
        "time is won back; off on CPU, where it made GPT-2 slower.")
    dropout: Number | None = doc(
        "Dropout of the model for fine-tuning (every dropout field of its config: GPT-2's resid_pdrop, "
        "embd_pdrop, attn_pdrop); null keeps the model's own (0.1 for GPT-2). 0 trains faster and often fits "
        "small data worse.", ge=0.0, lt=1.0)
    pad_vocab_multiple_of: Whole = doc(
        "Pad the embedding/output matrix to a multiple of this (64: GPT-2's 50257 -> 50304) for faster matmuls; "
        "the padding takes no part in the loss and is trimmed before saving. 0: off.", ge=0, le=1024)
    gradient_checkpointing: StrictBool = doc(
        "Recompute activations in the backward pass: less memory, ~30% more compute.")
    sharding: Literal["none", "zero2", "zero3"] = doc(
        "Shard the training state across the processes of a multi-GPU (or multi-node) run with DeepSpeed ZeRO "
        "through the Trainer: zero2 splits the AdamW states and gradients, zero3 the weights too (gpt2-xl full "
        "fine-tuning on 24 GB cards). none: plain DDP, every process holds everything. Needs 2 or more "
        "processes (NPROC_PER_NODE, NNODES); the saved model is the ordinary full one.")
    freeze: FreezeConfig = doc("Transfer learning: parts of the base model kept fixed.")
    lora: LoraSettings = doc("Parameter-efficient fine-tuning with peft LoRA.")
    memory_preflight: StrictBool = doc(
        "Estimate peak memory before training (calibrated per device, see pipeline/training/memory/) and stop, "
        "with the batch size that fits, if it and allowances for the allocator and NCCL exceed the free memory.")
    logging_steps: Whole = doc("Log training loss, learning rate and throughput every N optimizer steps.", ge=1,
                               le=STEPS_MAX)
    eval_steps: Whole = doc("Evaluate on the validation blocks every N steps (0: only at the end).", ge=0,
                            le=STEPS_MAX)
    save_steps: Whole = doc("Write a resumable checkpoint every N steps.", ge=1, le=STEPS_MAX)
    save_total_limit: Whole = doc("Checkpoints kept on disk (oldest deleted).", ge=1, le=10_000)
    load_best_model_at_end: StrictBool = doc(
        "Keep the checkpoint with the lowest validation loss instead of the last (needs eval_steps > 0 and "
        "save_steps a multiple of it).")
    early_stopping_patience: Whole = doc(
        "Stop after this many evaluations without improvement (0: off; needs load_best_model_at_end).", ge=0,
        le=10_000)
    dataloader_num_workers: Whole = doc("DataLoader worker processes, at most the machine's CPU cores.", ge=0,
                                        le=PROCESSES_MAX)
    report_to: Texts = doc(
        "Experiment trackers beside dvclive (always on), through the Trainer's integrations: tensorboard, wandb, "
        "mlflow, comet_ml, clearml, neptune, ... Each needs its package installed (pip install tensorboard).")
    samples: SamplesConfig = doc("Samples during training, into dvclive/samples.md.")


@dataclass(frozen=True, config=STRICT)
class EvaluateConfig:
    batch_size: Whole = doc("Blocks (or windows) per forward pass when evaluating.", ge=1, le=BATCH_MAX)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc(
        "Autocast precision of the forward passes (the loss is summed in fp32); auto as train.precision.")
    stride: Whole | None = doc(
        "Sliding-window perplexity: the window (block_size tokens) moves by this many tokens, so each token is "
        "scored once with at least block_size - stride tokens of context. null: block_size / 2.", ge=1,
        le=TOKENS_MAX)


@dataclass(frozen=True, config=STRICT)
class GenerateConfig:
    prompts: Prompts = doc("Prompts to continue.")
    prompts_file: Text | None = doc(
        "More prompts: a text file (one per line) or JSONL (a \"prompt\" field per line), kept in data/prompts/ "
        "(the generate stage's dependency).")
    max_new_tokens: Whole = doc("Tokens generated per sample (the prompt and these within the model's positions).",
                                ge=1, le=TOKENS_MAX)
    do_sample: StrictBool = doc("Sample (true) or greedy decode (false).")
    temperature: Number = doc(
        "Sampling temperature (below 1e-4 it is greedy decoding in all but name: do_sample: false).", ge=1e-4,
        le=100.0)
    top_k: Whole = doc("Keep the k most likely tokens (0 disables; at most the vocabulary).", ge=0, le=2**24)
    top_p: Number = doc("Nucleus sampling mass.", gt=0.0, le=1.0)
    repetition_penalty: Number = doc("Penalise tokens already present (1.0: off; 1.2 is common).", ge=1e-4, le=100.0)
    no_repeat_ngram_size: Whole = doc("Never repeat an n-gram of this size (0: off; at most max_new_tokens).", ge=0,
                                      le=TOKENS_MAX)
    stop: Stops = doc("Stop a sample at the first of these strings (it is cut there); at most 64, of at most 200 "
                      "characters each.")
    num_return_sequences: Whole = doc("Samples per prompt.", ge=1, le=1000)
    batch_size: Whole = doc(
        "Samples (prompts x num_return_sequences, taken in order) per generate() call, left-padded, sharing the "
        "forward passes and holding a KV cache each: the larger, the faster, until memory runs out.", ge=1,
        le=BATCH_MAX)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc(
        "The weights' dtype while sampling (fp32 logits for the sampler); auto as train.precision.")
    compare_base: StrictBool = doc("Also sample the base model, shown side by side in samples.md.")
    seed: Whole = doc("Sampling seed; the same seed and prompts give the same samples.", ge=0, le=SEED_MAX)


@dataclass(frozen=True, config=STRICT)
class PublishConfig:
    repo_id: Text | None = doc(
        "Hub repo that `python -m pipeline.tools.publish` pushes models/finetuned to (namespace/name; a name alone "
        "goes under the token's user). null: pass --repo-id. Never part of dvc repro.")
    private: StrictBool = doc(
        "Create the repo private. While true, an existing public repo is refused rather than written to.")


@dataclass(frozen=True, config=STRICT)
class ClassifyConfig:
    label_column: Text = doc("task: classification. The column holding each record's label (strings or ints).")
    labels: Annotated[list[Text], Field(min_length=2, max_length=1000)] | None = doc(
        "The label names, in the order of their ids. null: the dataset's ClassLabel names, else the sorted "
        "distinct labels of the training split.")
    bad_rows: Literal["drop", "refuse"] = doc(
        "Records with a missing or unknown label, or no text: drop them (counted per reason in "
        "metrics/data.json) or refuse (stop, naming the first).")
    class_weights: Literal["none", "balanced"] = doc(
        "balanced: weigh the loss of each class by n / (classes x its count in train), for imbalanced data.")
    padding_side: Literal["right", "left"] = doc(
        "Where texts are padded to preprocess.block_size. Both classify from the last real token (the pad "
        "token is one of its own, never EOS); left also gives GPT-2 position ids that start at the text.")
    best_metric: Literal["macro_f1", "accuracy", "loss"] = doc(
        "The validation metric train.load_best_model_at_end and early stopping follow.")
    zero_shot_prompt: LongText = doc(
        "The base model's zero-shot baseline in evaluate: each label name is scored as the continuation of "
        "this template (a {text} field) and the likeliest is its answer.")


@dataclass(frozen=True, config=STRICT)
class Params:
    seed: Whole = doc("One seed for model init (from scratch), data split, data order and dropout.", ge=0,
                      le=SEED_MAX)
    task: Literal["causal_lm", "classification"] = doc(
        "What the model learns: causal_lm (continue text) or classification (a label per text, "
        "GPT2ForSequenceClassification; settings under classify).")
    lr: Number = doc("Peak learning rate (top level so `dvc exp run -S lr=5e-4` works).", gt=0.0, le=1.0)
    model: ModelConfig = doc("Base model and tokenizer.")
    data: DataConfig = doc("Raw dataset source.")
    preprocess: PreprocessConfig = doc("Tokenize, add EOS, chunk and split.")
    train: TrainConfig = doc("Fine-tuning hyperparameters (Hugging Face Trainer).")
    evaluate: EvaluateConfig = doc("Base vs fine-tuned evaluation.")
    generate: GenerateConfig = doc(
        "Sampling from the fine-tuned model; with task: classification, the labels of generate.prompts (and "
        "prompts_file) predicted instead (the sampling settings are not used).")
    classify: ClassifyConfig = doc("Text classification (task: classification).")
    publish: PublishConfig = doc("Pushing the fine-tuned model to the Hub (pipeline.tools.publish, not a stage).")
