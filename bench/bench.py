"""Side-by-side benchmark of the pipeline's stages against the Hugging Face defaults (`make bench`).

Every case runs in a fresh process (the same allocator state, imports and threads for both sides)
on the same blocks, the same model config and the same seed, on this machine, one after the other:

- train: the train stage (pipeline.train.train) vs the transformers Trainer with run_clm.py's defaults
  (fp32, default attention, AdamW, default collator), on the GPT-2 124M architecture built from its
  config (block 512) and on the demo's tiny config (block 128): tokens/s over trainer.train(), the
  ratio, and the training loss after the same number of tokens;
- preprocess: pipeline.preprocess.build_blocks vs run_clm's tokenize + group_texts (datasets.map);
- evaluate: pipeline.evaluate.token_nll vs Trainer.evaluate() with defaults.

Text: the Python Language Reference shipped with CPython (as in the demo). Figures are printed, never
asserted: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {  # name: (GPT2Config overrides, block size, per-device batch, optimizer steps)
    "gpt2-124M": ({}, 512, 4, int(os.environ.get("BENCH_STEPS_124M", 12))),
    "tiny": ({"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 128}, 128, 8, 60),
}


# --- shared inputs ---------------------------------------------------------------------------------

def prepare(work: Path) -> None:
    """Tokenizer, raw text, base models and blocks, once, under `work`."""
    from pipeline.common import load_tokenizer
    from pipeline.config import DataConfig, ModelConfig, PreprocessConfig
    from pipeline.demo import write_gpt2_tokenizer, write_python_reference
    from pipeline.download import save_base
    from pipeline.preprocess import build_blocks
    from pipeline.sources import load_raw

    write_gpt2_tokenizer(work / "tokenizer")
    write_python_reference(work / "text")
    raw, _ = load_raw(DataConfig(dataset=str(work / "text"), config=None), work)
    raw.save_to_disk(str(work / "raw"))
    tokenizer = load_tokenizer(work / "tokenizer")
    for name, (overrides, block, _, _) in CONFIGS.items():
        save_base(ModelConfig(name=name, tokenizer=str(work / "tokenizer"), from_scratch=True,
                              config_overrides=overrides), 0, work / name / "base")
        blocks, _, _ = build_blocks(raw, tokenizer, 1024, DataConfig(dataset="x"),
                                    PreprocessConfig(block_size=block, val_fraction=0.1), 0)
        blocks.save_to_disk(str(work / name / "blocks"))


# --- cases, each run in its own process ------------------------------------------------------------

def case_train_pipeline(work: Path, name: str) -> dict:
    from dataclasses import replace

    from pipeline.common import keep_freed_memory
    from pipeline.config import Params
    from pipeline.train import train

    keep_freed_memory()  # what the stage's CLI does first
    _, block, batch, steps = CONFIGS[name]
    params = Params(seed=0, lr=5e-5)
    variant = json.loads(os.environ.get("BENCH_TRAIN", "{}"))  # e.g. BENCH_TRAIN='{"loss_chunk_tokens": 0}'
    params = replace(params, train=replace(params.train, max_steps=steps, per_device_train_batch_size=batch,
                                           logging_steps=1, eval_steps=0, save_steps=10**6, **variant))
    out = Path(tempfile.mkdtemp(dir=work))
    metrics = train(params, work / name / "blocks", work / name / "base", out / "model", out / "ckpt", out / "live")
    return {"tokens_per_second": metrics["tokens_per_second"], "loss": metrics["final_train_loss"],
            "tokens": metrics["tokens_seen"],
            "setup": f"{metrics['precision']}, {metrics['attention']} attention "
                     f"({', '.join(f'{k} {v:,.0f} ms' for k, v in metrics['attention_timings_ms'].items())}), "
                     f"{params.train.optimizer}, "
                     f"vocab padded to {params.train.pad_vocab_multiple_of or 'no'} multiple, "
                     f"loss chunk {params.train.loss_chunk_tokens or 'off'}"}


def case_train_baseline(work: Path, name: str) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    _, block, batch, steps = CONFIGS[name]
    blocks = datasets.load_from_disk(str(work / name / "blocks"))["train"].with_format("torch", dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(work / name / "base")
    # run_clm's defaults, checkpointing included (save_strategy "steps": a checkpoint at the end, as the stage)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(dir=work), max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=5e-5, seed=0, data_seed=0, logging_steps=1, report_to="none",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = steps * batch * block
    # transformers 5 counts position 0 of every block as a target for GPT2LMHeadModel (its loss_type is
    # None), so its logged loss is the true mean times (T-1)/T; undo that to compare like with like
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1] * block / (block - 1)
    return {"tokens_per_second": tokens / seconds, "loss": loss, "tokens": tokens,
            "setup": "fp32, sdpa attention, AdamW, full logits"}


def raw_text(work: Path, copies: int = 8) -> list[str]:
    import datasets

    texts = list(datasets.load_from_disk(str(work / "raw"))["train"]["text"])
    return texts * copies  # ~0.9M tokens: long enough to time


def case_preprocess_pipeline(work: Path) -> dict:
    import datasets

    from pipeline.common import load_tokenizer
    from pipeline.config import DataConfig, PreprocessConfig
    from pipeline.preprocess import build_blocks

    datasets.disable_caching()
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": raw_text(work)})})
    tokenizer = load_tokenizer(work / "tokenizer")
    start = time.perf_counter()
    _, stats, _ = build_blocks(raw, tokenizer, 1024, DataConfig(dataset="x"), PreprocessConfig(block_size=512), 0)
    seconds = time.perf_counter() - start
    tokens = stats["train"]["tokens"] + stats["validation"]["tokens"]
    return {"tokens_per_second": tokens / seconds, "tokens": tokens, "setup": "batched map, EOS, numpy chunking"}


def case_preprocess_baseline(work: Path) -> dict:
    """run_clm.py's tokenize_function and group_texts, as written there."""
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()
    raw = datasets.Dataset.from_dict({"text": raw_text(work)}).train_test_split(test_size=0.05, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")
    block_size = 512

    def tokenize_function(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {k: [t[i: i + block_size] for i in range(0, total_length, block_size)]
                  for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    start = time.perf_counter()
    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])
    tokens = sum(len(x) for split in tokenized.values() for x in split["input_ids"])
    tokenized.map(group_texts, batched=True)
    seconds = time.perf_counter() - start
    return {"tokens_per_second": tokens / seconds, "tokens": tokens, "setup": "tokenize + group_texts (run_clm)"}


def case_evaluate_pipeline(work: Path, name: str) -> dict:
    import datasets

    from pipeline.common import keep_freed_memory, load_model, resolve_precision
    from pipeline.evaluate import token_nll

    keep_freed_memory()
    blocks = datasets.load_from_disk(str(work / name / "blocks"))["validation"]
    model = load_model(work / name / "base")
    precision = resolve_precision("auto")  # the stage's default
    start = time.perf_counter()
    nll, tokens = token_nll(model, blocks, 8, precision)
    seconds = time.perf_counter() - start
    return {"tokens_per_second": len(blocks) * len(blocks[0]["input_ids"]) / seconds, "loss": nll / tokens,
            "setup": f"inference_mode, {precision}, chunked loss, batch 8"}


def case_evaluate_baseline(work: Path, name: str) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    blocks = datasets.load_from_disk(str(work / name / "blocks"))["validation"].with_format("torch", dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(work / name / "base")
    args = TrainingArguments(output_dir=tempfile.mkdtemp(dir=work), per_device_eval_batch_size=8, report_to="none",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, eval_dataset=blocks, data_collator=default_data_collator)
    start = time.perf_counter()
    loss = trainer.evaluate()["eval_loss"] * len(blocks[0]["input_ids"]) / (len(blocks[0]["input_ids"]) - 1)  # as above
    seconds = time.perf_counter() - start
    return {"tokens_per_second": len(blocks) * len(blocks[0]["input_ids"]) / seconds, "loss": loss,
            "setup": "Trainer.evaluate(), fp32, batch 8"}


CASES = {
    "train-pipeline": case_train_pipeline, "train-baseline": case_train_baseline,
    "preprocess-pipeline": case_preprocess_pipeline, "preprocess-baseline": case_preprocess_baseline,
    "evaluate-pipeline": case_evaluate_pipeline, "evaluate-baseline": case_evaluate_baseline,
}


def run_case(work: Path, case: str, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--work", str(work), "--case", case, *args], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{case} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(work: Path, what: str, *args: str) -> str:
    baseline, ours = run_case(work, f"{what}-baseline", *args), run_case(work, f"{what}-pipeline", *args)
    ratio = ours["tokens_per_second"] / baseline["tokens_per_second"]
    losses = (f" | {baseline['loss']:.4f} | {ours['loss']:.4f}" if "loss" in ours else " | | ")
    return (f"| {what} {' '.join(args)} | {baseline['tokens_per_second']:,.0f} | {ours['tokens_per_second']:,.0f} "
            f"| **{ratio:.2f}x**{losses} | {baseline['setup']} | {ours['setup']} |")


def machine() -> str:
    """The matmul peaks that bound the train ratio: bf16 vs fp32 on this machine, now."""
    from pipeline.throughput import measured_matmul_flops

    bf16, fp32 = measured_matmul_flops("bf16", seconds=2), measured_matmul_flops("fp32", seconds=2)
    return (f"machine now: 2048x2048 matmul bf16 {bf16 / 1e12:.2f} TFLOP/s, fp32 {fp32 / 1e12:.2f} TFLOP/s "
            f"(ratio {bf16 / fp32:.1f}x)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="Working directory (default: a temporary one).")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["train", "preprocess", "evaluate"], action="append",
                        help="Run only these comparisons.")
    parser.add_argument("name", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one case, JSON on stdout
        print(json.dumps(CASES[args.case](args.work, *([args.name] if args.name else []))))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="gpt2-bench-"))
    if not (work / "tokenizer").exists():
        prepare(work)
    only = args.only or ["preprocess", "evaluate", "train"]
    print(machine())
    print("| case | baseline tokens/s | pipeline tokens/s | ratio | baseline loss | pipeline loss "
          "| baseline | pipeline |")
    print("|---|---|---|---|---|---|---|---|")
    rows = ([("preprocess",)] if "preprocess" in only else []) + \
           ([("evaluate", n) for n in CONFIGS] if "evaluate" in only else []) + \
           ([("train", n) for n in CONFIGS] if "train" in only else [])
    for row in rows:
        print(compare(work, *row), flush=True)


if __name__ == "__main__":
    main()
