"""The classifier side by side with its peer (`make bench` runs it after bench.py), on this machine, one after
the other, each in a fresh process: the train stage with task: classification against the Trainer set up as
transformers' run_classification.py sets it up for GPT-2 (AutoModelForSequenceClassification, pad token =
EOS, every text padded to max_seq_length, default collator, its defaults: fp32, AdamW, linear schedule), on
the same texts and labels (standard library docstrings by module family, the demo's data), the same
validation split, the same model (a tiny GPT-2 built from a config, seeded) and the same hyper-parameters.
Printed: training tokens/s (padding included, as both compute it), the ratio, and accuracy and macro-F1 on
the validation split. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 128}
BLOCK, BATCH, EPOCHS, LR, SEED = 128, 16, 3, 2e-3, 0


def prepare(work: Path) -> None:
    """Texts, labels, the tokenizer, the base model and the pipeline's blocks, once, under `work`."""
    from pipeline.core.loading import load_tokenizer
    from pipeline.core.outputs import write_json, write_manifest
    from pipeline.data.sources import load_raw
    from pipeline.download import save_base
    from pipeline.tasks.classification.preprocess import build_examples
    from pipeline.tools.corpora import write_gpt2_tokenizer, write_stdlib_docstrings
    from tests.support import project_section

    write_gpt2_tokenizer(work / "tokenizer")
    write_stdlib_docstrings(work / "docstrings.jsonl")
    save_base(project_section("model", name="tiny", tokenizer=str(work / "tokenizer"), from_scratch=True,
                              config_overrides=MODEL), SEED, work / "base")
    raw, _ = load_raw(project_section("data", dataset=str(work / "docstrings.jsonl"), config=None), work)
    processed, _, names, _ = build_examples(
        raw, load_tokenizer(work / "tokenizer"), project_section("data", dataset="x", config=None),
        project_section("preprocess", mode="pad", block_size=BLOCK, add_eos=False, val_fraction=0.2),
        project_section("classify"), SEED)
    processed.save_to_disk(str(work / "blocks"))  # as the preprocess stage writes them, provenance and all
    write_json(work / "blocks/provenance.json", {"task": "classification", "labels": names,
                                                 "preprocess": {"block_size": BLOCK, "add_eos": False},
                                                 "classify": {"padding_side": "right"}})
    for folder in ("blocks", "base"):  # what the stages check of the folders they read
        write_manifest(work / folder)
    (work / "labels.json").write_text(json.dumps(names))


def evaluation(model, work: Path, blocks) -> dict:
    import numpy as np

    from pipeline.tasks.classification.metrics import scores
    from pipeline.tasks.classification.scoring import probabilities

    names = json.loads((work / "labels.json").read_text())
    predicted = probabilities(model, blocks, 64, "fp32").argmax(1)
    result = scores(np.asarray(blocks["labels"]), predicted, names)
    return {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"]}


def case_pipeline(work: Path) -> dict:
    from dataclasses import replace

    import datasets

    from pipeline.core.config import Params
    from pipeline.core.device import keep_freed_memory
    from pipeline.core.loading import load_model
    from pipeline.core.params import project_params
    from pipeline.train import train

    keep_freed_memory()
    params: Params = replace(project_params(), seed=SEED, lr=LR, task="classification")
    params = replace(params, train=replace(params.train, num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
                                           eval_steps=0, save_steps=10**6, logging_steps=10))
    out = Path(tempfile.mkdtemp(dir=work))
    metrics = train(params, work / "blocks", work / "base", out / "model", out / "ckpt", out / "live",
                    out / "train.json")
    model = load_model(out / "model", task="classification")
    return {"tokens_per_second": metrics["tokens_per_second"],
            **evaluation(model, work, datasets.load_from_disk(str(work / "blocks"))["validation"]),
            "setup": f"{metrics['precision']}, {metrics['attention']} attention, {params.train.optim}, "
                     "pad token of its own"}


def case_peer(work: Path) -> dict:
    import datasets
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments, default_data_collator

    from pipeline.core.loading import load_tokenizer
    from pipeline.tasks.classification.metrics import scores
    from pipeline.tasks.classification.scoring import texts_of

    tokenizer = load_tokenizer(work / "tokenizer")  # pad = EOS, as users set it for GPT-2
    blocks = datasets.load_from_disk(str(work / "blocks"))
    names = json.loads((work / "labels.json").read_text())

    def dataset(split: str) -> datasets.Dataset:  # run_classification: the texts, padded to max_seq_length
        texts = texts_of(blocks[split], tokenizer)
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=BLOCK)
        return datasets.Dataset.from_dict({**encoded, "labels": blocks[split]["labels"]}).with_format("torch")

    train = dataset("train")
    model = AutoModelForSequenceClassification.from_pretrained(work / "base", num_labels=len(names),
                                                               pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(SEED)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(dir=work), num_train_epochs=EPOCHS, learning_rate=LR,
                             per_device_train_batch_size=BATCH, seed=SEED, data_seed=SEED, logging_steps=10,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = trainer.state.global_step * BATCH * BLOCK
    predicted = trainer.predict(dataset("validation")).predictions.argmax(-1)
    result = scores(np.asarray(blocks["validation"]["labels"]), predicted, names)
    return {"tokens_per_second": tokens / seconds, "accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
            "setup": "fp32, sdpa attention, AdamW, pad = EOS"}


CASES = {"pipeline": case_pipeline, "peer": case_peer}


def run_case(work: Path, case: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--work", str(work), "--case", case], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"classify {case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="Working directory (default: a temporary one).")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one case, JSON on stdout
        print(json.dumps(CASES[args.case](args.work)))
        return
    if os.environ.get("BENCH_QUICK", "0") not in ("", "0"):  # `make bench BENCH_QUICK=1`: bench.py's headline alone
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="gpt2-bench-classify-"))
    if not (work / "blocks").exists():
        prepare(work)
    peer, ours = run_case(work, "peer"), run_case(work, "pipeline")
    print(f"classification: {EPOCHS} epochs of {len(json.loads((work / 'labels.json').read_text()))}-class "
          f"standard library docstrings, a {MODEL['n_layer']}-layer {MODEL['n_embd']}-wide GPT-2 from its config, "
          f"block {BLOCK}, batch {BATCH}, lr {LR}")
    print("| | run_classification-style Trainer | train stage | ratio |")
    print("|---|---|---|---|")
    print(f"| training tokens/s | {peer['tokens_per_second']:,.0f} | {ours['tokens_per_second']:,.0f} | "
          f"**{ours['tokens_per_second'] / peer['tokens_per_second']:.2f}x** |")
    for key in ("accuracy", "macro_f1"):
        print(f"| validation {key} | {peer[key]:.3f} | {ours[key]:.3f} | |")
    print(f"| setup | {peer['setup']} | {ours['setup']} | |")


if __name__ == "__main__":
    main()
