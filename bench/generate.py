"""Side-by-side benchmark of the generate stage's sampling (`make bench`, or `python bench/generate.py`).

Many samples per prompt, as users curate from: the demo's two prompts, top_k 50, top_p 0.95,
temperature 0.8, 40 new tokens each, every sample of a prompt in one generate() call, on
- the demo's shape (4 layers, 128 wide, GPT-2's vocabulary), 200 samples per prompt;
- GPT-2 124M's shape, 50 samples per prompt (`--samples` scales both);
both built from their configs with seed 0 (random weights: no sample ends early, every run samples the
same number of tokens). Two sides, each in a fresh process, one after the other, on the same model:
- transformers' sampling: generate(do_sample=True, ...), drawing from the whole vocabulary each step;
- the stage's sampling: pipeline.generation.sampling.sample, drawing among the top_k candidates alone.
Each prints new tokens/s and its time split: the model's forward passes (timed by hooks, with a device
sync on CUDA), the rest of generate() (sampling, stopping, the loop), and the stage's copying and
repetition scores. Figures are printed, never asserted: the machines are shared and noisy.
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

SHAPES = {"demo": ({"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 128}, 200),
          "gpt2-124M": ({}, 50)}
PROMPTS = ["The for statement", "A class definition"]
SIDES = ("transformers", "stage")


def timed_forwards(model) -> list[float]:
    """Seconds spent in the model's forward passes, summed into the list's one item."""
    import torch

    spent, began = [0.0], [0.0]

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def start(*_: object) -> None:  # a hook that returns something replaces the forward's inputs
        sync()
        began[0] = time.perf_counter()

    def stop(*_: object) -> None:
        sync()
        spent[0] += time.perf_counter() - began[0]

    model.register_forward_pre_hook(start)
    model.register_forward_hook(stop)
    return spent


def run_side(side: str, shape: str, per_prompt: int, tokenizer_dir: Path) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.core.device import device
    from pipeline.core.loading import load_tokenizer
    from pipeline.generation.sampling import sample
    from pipeline.tasks.causal_lm.generate import score
    from tests.support import project_section

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**SHAPES[shape][0])).to(device()).eval()
    cfg = project_section("generate", prompts=PROMPTS, max_new_tokens=40, num_return_sequences=per_prompt,
                          batch_size=per_prompt, top_k=50, top_p=0.95, temperature=0.8, precision="fp32")
    forwards = timed_forwards(model)
    began = time.perf_counter()
    if side == "stage":
        records, _ = sample(model, tokenizer, PROMPTS, cfg)
    else:
        records = transformers_samples(model, tokenizer, cfg)
    seconds = time.perf_counter() - began
    train_ngrams = torch.randint(0, 2**62, (200_000,)).unique().numpy().astype("uint64")
    scored = time.perf_counter()
    score(records, train_ngrams)
    new_tokens = sum(len(r["ids"]) for r in records)
    return {"samples": len(records), "new_tokens": new_tokens, "seconds": seconds, "model_s": forwards[0],
            "score_s": time.perf_counter() - scored}


def transformers_samples(model, tokenizer, cfg) -> list[dict]:
    """generate()'s own sampling, one call per prompt (all its samples), as records sample() gives."""
    import torch

    tokenizer.padding_side = "left"
    records = []
    for start, prompt in enumerate(cfg.prompts):
        inputs = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(model.device)
        torch.manual_seed(cfg.seed + start)
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=True, top_k=cfg.top_k, top_p=cfg.top_p,
                                 temperature=cfg.temperature, num_return_sequences=cfg.num_return_sequences,
                                 max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.eos_token_id)
        width = inputs["input_ids"].shape[1]
        records += [{"prompt_ids": inputs["input_ids"][0].tolist(), "ids": row[width:].tolist()} for row in out]
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=float, default=1.0, help="Scale the samples per prompt (0.1: a tenth).")
    parser.add_argument("--side", nargs=3, metavar=("SIDE", "SHAPE", "PER_PROMPT"), help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.environ.get("BENCH_QUICK", "0") not in ("", "0"):  # `make bench BENCH_QUICK=1`: bench.py's headline alone
        return
    if args.side:  # one side, in its own process
        side, shape, per_prompt = args.side
        print(json.dumps(run_side(side, shape, int(per_prompt), args.tokenizer)))
        return
    import torch

    from pipeline.tools.corpora import write_gpt2_tokenizer

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"generate: {len(PROMPTS)} prompts x N samples, 40 new tokens, top_k 50, top_p 0.95, fp32, on {where}")
    with tempfile.TemporaryDirectory() as work:
        write_gpt2_tokenizer(Path(work) / "tokenizer")
        for shape, (_, per_prompt) in SHAPES.items():
            per_prompt = max(1, round(per_prompt * args.samples))
            results = {}
            for side in SIDES:
                out = subprocess.run([sys.executable, __file__, "--side", side, shape, str(per_prompt),
                                      "--tokenizer", str(Path(work) / "tokenizer")],
                                     capture_output=True, text=True, check=True)
                results[side] = r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{shape:>10} {side:>12}: {r['samples']} samples, {r['new_tokens'] / r['seconds']:7,.0f} "
                      f"tokens/s | model {r['model_s']:5.1f} s, rest of generate {r['seconds'] - r['model_s']:5.1f} "
                      f"s, scoring {r['score_s']:5.2f} s", flush=True)
            ratio = (results["stage"]["new_tokens"] / results["stage"]["seconds"]) / (
                results["transformers"]["new_tokens"] / results["transformers"]["seconds"])
            print(f"{shape:>10}  stage / transformers: {ratio:.2f}x tokens/s")


if __name__ == "__main__":
    main()
