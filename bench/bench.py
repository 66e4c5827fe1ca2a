"""Side-by-side benchmark of the pipeline's stages against their peers (`make bench`).

Every case runs in a fresh process (the same allocator state, imports and threads for each side)
on the same blocks, the same model config and the same seed, on this machine, one after the other.
Figures are printed, never asserted: the machines are shared and noisy.

On a CUDA GPU (the job the pipeline is built for), GPT-2 124M built from its config, block 1024, bf16,
per-device batch 16 and 32, 100 optimizer steps on the same blocks:
- the Trainer with run_clm.py's defaults + bf16 (fused AdamW, sdpa, no compile, vocabulary 50257);
- the tuned Trainer: + torch_compile and the vocabulary padded to 50304, the model computing its own loss;
- the train stage (pipeline.train.train) with torch_compile on (as `auto` has it for runs of 5M tokens);
each with its steady tokens/s and MFU (pipeline.training.throughput.ThroughputMeter: after 10 warm-up steps,
without evaluations or checkpoint saves), its peak (torch.cuda.max_memory_allocated from the first
step) and the preflight's estimate for its settings, and the ratio to the tuned Trainer. `--only memory`
runs the train stage on gpt2, gpt2-medium and gpt2-xl shapes (LoRA, gradient checkpointing) for a few
steps each and prints the measured peak beside the estimate. `BENCH_QUICK=1` (or `--quick`) runs the
headline alone: the train stage against the tuned Trainer, gpt2 at batch 32, printing its estimate of
the time first (a GPU lent for 15 minutes). No case writes a checkpoint, and each case's folder is
removed when it is done (gpt2-xl's weights and AdamW states are ~18 GB a checkpoint).

On a CPU:
- train: the train stage vs the Trainer with run_clm.py's defaults (fp32, default attention, AdamW,
  default collator), on the GPT-2 124M architecture built from its config (block 512) and on the demo's
  tiny config (block 128): tokens/s over trainer.train(), the ratio, and the training loss after the
  same number of tokens;
- preprocess: pipeline.preprocess.build_blocks vs run_clm's tokenize + group_texts (datasets.map);
- evaluate: the evaluate stage's scoring (tests/support.token_nll) vs Trainer.evaluate() with defaults.

Text: the Python Language Reference shipped with CPython (as in the demo).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    from pipeline.core.loading import load_tokenizer
    from pipeline.core.outputs import write_json, write_manifest
    from pipeline.data.sources import load_raw
    from pipeline.download import save_base
    from pipeline.tasks.causal_lm.preprocess import build_blocks
    from pipeline.tools.corpora import write_gpt2_tokenizer, write_python_reference
    from tests.support import project_section

    write_gpt2_tokenizer(work / "tokenizer")
    write_python_reference(work / "text")
    raw, _ = load_raw(project_section("data", dataset=str(work / "text"), config=None), work)
    raw.save_to_disk(str(work / "raw"))
    tokenizer = load_tokenizer(work / "tokenizer")
    for name, (overrides, block, _, _) in CONFIGS.items():
        save_base(project_section("model", name=name, tokenizer=str(work / "tokenizer"), from_scratch=True,
                              config_overrides=overrides), 0, work / name / "base")
        blocks, _, _ = build_blocks(raw, tokenizer, 1024, project_section("data", dataset="x"),
                                    project_section("preprocess", block_size=block, val_fraction=0.1), 0)
        blocks.save_to_disk(str(work / name / "blocks"))
        write_json(work / name / "blocks/provenance.json", {"task": "causal_lm"})  # as preprocess writes it
        for folder in ("base", "blocks"):  # what the stages check of the folders they read
            write_manifest(work / name / folder)


# --- cases, each run in its own process ------------------------------------------------------------

@contextmanager
def case_folder(work: Path) -> Iterator[Path]:
    """A folder for one case's outputs (model, checkpoints, logs), removed when the case is done."""
    folder = Path(tempfile.mkdtemp(dir=work))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def case_train_pipeline(work: Path, name: str) -> dict:
    from dataclasses import replace

    from pipeline.core.device import keep_freed_memory
    from pipeline.core.params import project_params
    from pipeline.train import train

    keep_freed_memory()  # what the stage's CLI does first
    _, block, batch, steps = CONFIGS[name]
    params = replace(project_params(), seed=0, lr=5e-5)
    variant = json.loads(os.environ.get("BENCH_TRAIN", "{}"))  # e.g. BENCH_TRAIN='{"dropout": 0.0}'
    params = replace(params, train=replace(params.train, max_steps=steps, per_device_train_batch_size=batch,
                                           logging_steps=1, eval_steps=0, save_steps=10**6, **variant))
    with case_folder(work) as out:
        metrics = train(params, work / name / "blocks", work / name / "base", out / "model", out / "ckpt",
                        out / "live", out / "train.json")
    return {"tokens_per_second": metrics["tokens_per_second"], "loss": metrics["final_train_loss"],
            "tokens": metrics["tokens_seen"],
            "setup": f"{metrics['precision']}, {metrics['attention']} attention "
                     f"({', '.join(f'{k} {v:,.0f} ms' for k, v in metrics.get('attention_timings_ms', {}).items())}), "
                     f"{params.train.optim}, vocab padded to a multiple of {params.train.pad_vocab_multiple_of}"}


def case_train_baseline(work: Path, name: str) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

    _, block, batch, steps = CONFIGS[name]
    blocks = datasets.load_from_disk(str(work / name / "blocks"))["train"].with_format("torch", dtype=torch.long)
    model = AutoModelForCausalLM.from_pretrained(work / name / "base")
    with case_folder(work) as out:
        # run_clm's defaults, checkpointing included (save_strategy "steps": a checkpoint at the end, as the stage)
        args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
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

    from pipeline.core.loading import load_tokenizer
    from pipeline.tasks.causal_lm.preprocess import build_blocks
    from tests.support import project_section

    datasets.disable_caching()
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": raw_text(work)})})
    tokenizer = load_tokenizer(work / "tokenizer")
    start = time.perf_counter()
    _, stats, _ = build_blocks(raw, tokenizer, 1024, project_section("data", dataset="x"),
                               project_section("preprocess", block_size=512), 0)
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

    from pipeline.core.device import keep_freed_memory, resolve_precision
    from pipeline.core.loading import load_model
    from tests.support import token_nll

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
    with case_folder(work) as out:
        args = TrainingArguments(output_dir=str(out), per_device_eval_batch_size=8, report_to="none", use_cpu=True,
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, eval_dataset=blocks, data_collator=default_data_collator)
        start = time.perf_counter()
        loss = trainer.evaluate()["eval_loss"] * len(blocks[0]["input_ids"]) / (len(blocks[0]["input_ids"]) - 1)
        seconds = time.perf_counter() - start
    return {"tokens_per_second": len(blocks) * len(blocks[0]["input_ids"]) / seconds, "loss": loss,
            "setup": "Trainer.evaluate(), fp32, batch 8"}


# --- on a GPU: the train stage against the Trainer, tuned and not -----------------------------------

GPU_STEPS = int(os.environ.get("BENCH_GPU_STEPS", 100))
GPU_BATCHES = (16, 32)
QUICK_BATCH = 32  # BENCH_QUICK: the headline alone, at the batch the GPU profiles train with
# BENCH_QUICK's estimate of its own time: what the runs are assumed to reach and to cost besides training (the
# figures of docs/speed.md, made more cautious): MFU (the stage measured 18-21% on an H100, the tuned Trainer
# 24-32%), compilation (~40 s for gpt2 there), a fresh process's start-up, set-up and saves, and the blocks
# and base model prepared once
ASSUMED_MFU, COMPILE_SECONDS, START_SECONDS, PREPARE_SECONDS = 0.2, 60, 30, 60
GPU_SIZES = {"gpt2": {}, "gpt2-medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
             "gpt2-xl": {"n_layer": 48, "n_embd": 1600, "n_head": 25}}
MEMORY_SHAPES = [  # the shapes the preflight is held to: size, per-device batch, train params
    ("gpt2", 16, {}), ("gpt2", 32, {}), ("gpt2-medium", 16, {}), ("gpt2-xl", 4, {}),
    ("gpt2-xl", 16, {"gradient_checkpointing": True}), ("gpt2-xl", 8, {"lora": {"enabled": True}}),
]


def prepare_gpu(work: Path, sizes: list[str]) -> None:
    """Blocks of 1024 tokens, enough for GPU_STEPS steps of 32 blocks inside one epoch (a smaller last
    batch would make the compiled runs compile again), and a base model of each size, from its config."""
    import datasets

    from pipeline.core.loading import load_tokenizer
    from pipeline.core.outputs import write_json, write_manifest
    from pipeline.data.sources import load_raw
    from pipeline.download import save_base
    from pipeline.tasks.causal_lm.preprocess import build_blocks
    from pipeline.tools.corpora import write_gpt2_tokenizer, write_python_reference
    from tests.support import project_section

    if not (work / "tokenizer").exists():
        write_gpt2_tokenizer(work / "tokenizer")
        write_python_reference(work / "text")
        raw, _ = load_raw(project_section("data", dataset=str(work / "text"), config=None), work)
        raw.save_to_disk(str(work / "raw"))
    if not (work / "gpu-blocks").exists():
        texts = raw_text(work, copies=max(8, GPU_STEPS * max(GPU_BATCHES) // 100))  # ~113 blocks per copy
        raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})})
        blocks, _, _ = build_blocks(raw, load_tokenizer(work / "tokenizer"), 1024, project_section("data", dataset="x"),
                                    project_section("preprocess", block_size=1024, val_fraction=0.01), 0)
        blocks.save_to_disk(str(work / "gpu-blocks"))
        write_json(work / "gpu-blocks/provenance.json", {"task": "causal_lm"})  # as preprocess writes it
        write_manifest(work / "gpu-blocks")  # what the stages check of the folders they read
    for size in sizes:
        if not (work / size / "base").exists():
            save_base(project_section("model", name=size, tokenizer=str(work / "tokenizer"), from_scratch=True,
                                  config_overrides=GPU_SIZES[size]), 0, work / size / "base")
            write_manifest(work / size / "base")


def case_gpu_peer(work: Path, spec: str) -> dict:
    """The Trainer on GPT-2 124M: run_clm's defaults + bf16, or tuned (compile, vocabulary padded to 50304,
    the model's own loss over it), measured with the same meter as the stage; it saves no checkpoint."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    from pipeline.training.memory.estimate import GIB, RunShape, estimate_memory, model_shape
    from pipeline.training.throughput import ThroughputMeter, flops_per_token, meter_callback, peak_flops, warmup_steps

    batch, tuned = json.loads(spec)["batch"], json.loads(spec)["tuned"]
    model = AutoModelForCausalLM.from_pretrained(work / "gpt2" / "base")
    if tuned:
        model.resize_token_embeddings(model.config.vocab_size, pad_to_multiple_of=64, mean_resizing=False)

    class ResetPeak(TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

    flops = flops_per_token(model.num_parameters() - 1024 * 768, 12, 768, 1024)
    meter = ThroughputMeter(batch * 1024, flops, peak_flops("bf16")[0], warmup=warmup_steps(GPU_STEPS))
    blocks = datasets.load_from_disk(str(work / "gpu-blocks"))["train"]
    with case_folder(work) as out:
        args = TrainingArguments(output_dir=str(out), max_steps=GPU_STEPS, learning_rate=5e-5,
                                 per_device_train_batch_size=batch, seed=0, data_seed=0, bf16=True,
                                 torch_compile=tuned, logging_steps=10, save_strategy="no", report_to="none",
                                 disable_tqdm=True, use_cpu=not torch.cuda.is_available())  # (a dry run on a CPU)
        trainer = Trainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator,
                          callbacks=[meter_callback(meter), ResetPeak()])
        trainer.train()
    estimate = estimate_memory(model_shape(model), RunShape("cuda", "bf16", batch, 8, 1024, compiled=tuned))
    steady = meter.steady()
    return {"steady": steady["steady_tokens_per_second"], "mfu": steady["steady_mfu"],
            "peak": torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else 0.0,
            "estimate": estimate.total / GIB}


def without_checkpoints() -> None:
    """Build the stage's Trainer with saving off. With save_strategy "steps" the Trainer writes a checkpoint
    at the last step of every run, the weights and AdamW states (~18 GB for gpt2-xl), which the bench never
    reads; the stage still saves the model it trained."""
    from transformers.trainer_utils import SaveStrategy

    import pipeline.train as stage

    make_trainer = stage.make_trainer

    def saving_nothing(*args, **kwargs):  # noqa: ANN202 - the Trainer
        trainer = make_trainer(*args, **kwargs)
        trainer.args.save_strategy = SaveStrategy.NO
        return trainer

    stage.make_trainer = saving_nothing


def case_gpu_pipeline(work: Path, spec: str) -> dict:
    """The train stage on a GPT-2 of `size` (steps, batch and train params from the spec), no checkpoint."""
    from pipeline.core.device import keep_freed_memory
    from pipeline.core.params import PROJECT_PARAMS, from_dict, merge, read_yaml
    from pipeline.train import train

    keep_freed_memory()
    without_checkpoints()
    spec = json.loads(spec)
    train_params = {"max_steps": spec["steps"], "per_device_train_batch_size": spec["batch"], "logging_steps": 10,
                    "eval_steps": 0, "save_steps": 10**6, **spec["train"]}
    params = from_dict(merge(read_yaml(PROJECT_PARAMS), {"seed": 0, "lr": 5e-5, "model": {"name": spec["size"]},
                                                          "train": train_params}))
    with case_folder(work) as out:
        metrics = train(params, work / "gpu-blocks", work / spec["size"] / "base", out / "model", out / "ckpt",
                        out / "live", out / "train.json")
    return {"steady": metrics["steady_tokens_per_second"], "mfu": metrics["steady_mfu"],
            "peak": metrics["peak_memory_gib"], "estimate": metrics["memory_estimate_gib"],
            "attention": metrics["attention"], "compile": metrics["torch_compile"]}


def gpu_header() -> str:
    import time

    import torch
    import transformers

    from pipeline.training.throughput import warmup_steps

    return (f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, {time.strftime('%Y-%m-%d')}; GPT-2 from its config, block 1024, bf16, "
            f"{GPU_STEPS} steps, steady = after {warmup_steps(GPU_STEPS)} warm-up steps\n")


def gpu_train(work: Path, batches: tuple[int, ...] = GPU_BATCHES, untuned: bool = True) -> None:
    """The train stage against the tuned Trainer (and, with `untuned`, run_clm's defaults) at each batch."""
    print("| run | batch | steady tokens/s | MFU | peak GiB | preflight estimate GiB | vs tuned Trainer |")
    print("|---|---|---|---|---|---|---|")
    for batch in batches:
        stage = {"size": "gpt2", "batch": batch, "steps": GPU_STEPS, "train": {"torch_compile": True}}
        runs = {}
        if untuned:
            runs["Trainer, run_clm defaults + bf16"] = run_case(work, "gpu-peer", json.dumps({"batch": batch,
                                                                                             "tuned": False}))
        runs["Trainer + compile + vocab 50304"] = run_case(work, "gpu-peer", json.dumps({"batch": batch,
                                                                                        "tuned": True}))
        runs["train stage (torch_compile: true)"] = run_case(work, "gpu-pipeline", json.dumps(stage))
        tuned = runs["Trainer + compile + vocab 50304"]["steady"]
        for name, r in runs.items():
            print(f"| {name} | {batch} | {r['steady']:,.0f} | {100 * r['mfu']:.1f}% | {r['peak']:.1f} | "
                  f"{r['estimate']:.1f} | **{r['steady'] / tuned:.2f}x** |", flush=True)


def quick_estimate(runs: int, batch: int) -> str:
    """BENCH_QUICK's estimate of its own time, from the work: each compiled run's tokens x FLOPs per token
    over the assumed MFU of this device's peak, plus its compilation and start-up, plus preparing once."""
    from pipeline.training.throughput import flops_per_token, peak_flops
    from tests.support import gpt2_shape

    tokens = GPU_STEPS * batch * 1024
    flops = flops_per_token(gpt2_shape("gpt2").parameters - 1024 * 768, 12, 768, 1024)
    peak, source = peak_flops("bf16")
    training = tokens * flops / (ASSUMED_MFU * peak)
    total = PREPARE_SECONDS + runs * (training + COMPILE_SECONDS + START_SECONDS)
    return (f"quick: {runs} runs x {tokens / 1e6:.1f}M tokens x {flops / 1e6:.0f} MFLOP/token at an assumed "
            f"{100 * ASSUMED_MFU:.0f}% MFU of {peak / 1e12:.0f} TFLOP/s ({source}) = {training:.0f} s of training "
            f"each, + {COMPILE_SECONDS} s compiling and {START_SECONDS} s starting and saving each, + "
            f"{PREPARE_SECONDS} s preparing: about {total / 60:.1f} minutes\n")


def gpu_memory(work: Path) -> None:
    print("| train stage | batch | measured peak GiB | preflight estimate GiB | estimate error |")
    print("|---|---|---|---|---|")
    for size, batch, changes in MEMORY_SHAPES:
        r = run_case(work, "gpu-pipeline", json.dumps({"size": size, "batch": batch, "steps": 4,
                                                        "train": {"logging_steps": 1, **changes}}))
        name = f"{size} {json.dumps(changes) if changes else ''} ({r['attention']}, compile {r['compile']})"
        print(f"| {name} | {batch} | {r['peak']:.1f} | {r['estimate']:.1f} | "
              f"{100 * (r['estimate'] / r['peak'] - 1):+.1f}% |", flush=True)


CASES = {
    "train-pipeline": case_train_pipeline, "train-baseline": case_train_baseline,
    "preprocess-pipeline": case_preprocess_pipeline, "preprocess-baseline": case_preprocess_baseline,
    "evaluate-pipeline": case_evaluate_pipeline, "evaluate-baseline": case_evaluate_baseline,
    "gpu-peer": case_gpu_peer, "gpu-pipeline": case_gpu_pipeline,
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
    from pipeline.training.throughput import measured_matmul_flops

    bf16, fp32 = measured_matmul_flops("bf16", seconds=2), measured_matmul_flops("fp32", seconds=2)
    return (f"machine now: 2048x2048 matmul bf16 {bf16 / 1e12:.2f} TFLOP/s, fp32 {fp32 / 1e12:.2f} TFLOP/s "
            f"(ratio {bf16 / fp32:.1f}x)\n")


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu(work: Path, only: list[str], quick: bool) -> None:
    """The GPU comparisons: the train stage against the Trainer, and the preflight against measured peaks;
    `quick`: the stage against the tuned Trainer at one batch, nothing else."""
    started = time.perf_counter()
    if quick:
        print(quick_estimate(2, QUICK_BATCH), flush=True)
        only = ["train"]
    sizes = ["gpt2"] + (sorted({size for size, _, _ in MEMORY_SHAPES}) if "memory" in only else [])
    prepare_gpu(work, sorted(set(sizes)))
    print(gpu_header())
    if "train" in only:
        if quick:
            gpu_train(work, (QUICK_BATCH,), untuned=False)
        else:
            gpu_train(work)
    if "memory" in only:
        gpu_memory(work)
    print(f"\ntook {(time.perf_counter() - started) / 60:.1f} minutes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="Working directory (default: a temporary one).")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["train", "preprocess", "evaluate", "memory"], action="append",
                        help="Run only these comparisons (memory: the preflight against measured peaks, CUDA).")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK", "0") not in ("", "0"),
                        help="On a GPU, only the headline: the train stage against the tuned Trainer, gpt2 at "
                             f"batch {QUICK_BATCH} (also BENCH_QUICK=1); it prints its estimate of the time first.")
    parser.add_argument("name", nargs="?", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one case, JSON on stdout
        print(json.dumps(CASES[args.case](args.work, *([args.name] if args.name else []))))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="gpt2-bench-"))
    try:
        run_all(work, args.only, args.quick)
    finally:
        if args.work is None:  # the base models (gpt2-xl: 6 GB) and blocks of a temporary folder go too
            shutil.rmtree(work, ignore_errors=True)


def run_all(work: Path, only: list[str] | None, quick: bool) -> None:
    if on_cuda():
        gpu(work, only or ["train", "memory"], quick)
        return
    if quick:
        print("BENCH_QUICK: the GPU's headline only; on a CPU the bench runs whole (--only to run a part)")
    if not (work / "tokenizer").exists():
        prepare(work)
    only = only or ["preprocess", "evaluate", "train"]
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
