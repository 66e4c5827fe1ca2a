"""Stage 5, generate: sample continuations of the prompts from the fine-tuned model (and the base
model, side by side), and check every sample for copying and repetition.

Samples are batched (left padding, KV cache), generate.batch_size at a time; the same seed, prompts and
batch_size give the same samples.
Each sample gets the fraction of its token 8-grams found in the training blocks (memorisation;
users of gpt-2-simple found their models reproducing training jokes verbatim) and distinct-1/2
(repetition). Writes outputs/samples.jsonl (one record per sample), outputs/samples.md (base and
fine-tuned side by side) and metrics/generate.json (summaries, generation tokens/s).

Ad hoc, on any model directory, printing to the terminal (every sampling setting has a flag; '-'
reads prompts from standard input, one at a time in a terminal):
    python -m pipeline.generate --model models/finetuned --prompt "The history of" --temperature 0.7
    python -m pipeline.generate --prompt - --greedy --max-new-tokens 40
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pipeline.classification.prediction import predict, print_predictions, write_predictions
from pipeline.core.common import PipelineError, params_option, stage_command
from pipeline.core.config import GenerateConfig
from pipeline.core.device import take_gpus
from pipeline.core.loading import MADE_BY, check_folder, load_model, load_saved_dataset, load_tokenizer
from pipeline.core.outputs import hold_workspace, outputs, write_json, write_text
from pipeline.core.params import load_params
from pipeline.generation.adhoc import ad_hoc, ad_hoc_config, stdin_prompts
from pipeline.generation.prompts import load_prompts
from pipeline.generation.sampling import sample, sampling_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pipeline.core.config import Params

log = logging.getLogger(__spec__.name)  # under python -m, __name__ is "__main__"
NGRAM = 8  # memorisation is measured on token 8-grams


# --- copying and repetition ----------------------------------------------------------------------

def ngram_hashes(ids: Any, n: int) -> Any:
    """A 64-bit rolling hash of every n-gram of `ids` (numpy, wrapping arithmetic)."""
    import numpy as np

    ids = np.asarray(ids, dtype=np.uint64)
    if len(ids) < n:
        return np.zeros(0, dtype=np.uint64)
    hashes = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            hashes = hashes * np.uint64(1_000_003) + ids[k:len(ids) - n + 1 + k]
    return hashes


def training_ngrams(train: Any) -> Any:
    """Sorted unique hashes of the training blocks' token 8-grams."""
    import numpy as np

    return np.unique(ngram_hashes(np.asarray(train.with_format("numpy")["input_ids"]).reshape(-1), NGRAM))


def copied_fraction(prompt_ids: list[int], ids: list[int], train_ngrams: Any) -> float | None:
    """Fraction of the 8-grams ending in a generated token that occur in the training blocks: 1.0
    for a sample copied from the training text, near 0 for a fresh one."""
    import numpy as np

    hashes = ngram_hashes(prompt_ids[-(NGRAM - 1):] + ids, NGRAM)
    if not len(hashes):
        return None
    if not len(train_ngrams):
        return 0.0
    # a binary search in the sorted training hashes: np.isin would sort them again for every sample
    at = np.searchsorted(train_ngrams, hashes).clip(max=len(train_ngrams) - 1)
    return float((train_ngrams[at] == hashes).mean())


def distinct(ids: list[int], n: int) -> float | None:
    """Distinct n-grams over all n-grams of a sample (1.0: no repetition)."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def score(records: list[dict], train_ngrams: Any) -> None:
    for r in records:
        r["copied_8gram_fraction"] = copied_fraction(r["prompt_ids"], r["ids"], train_ngrams)
        r["distinct_1"], r["distinct_2"] = distinct(r["ids"], 1), distinct(r["ids"], 2)


def summary(records: list[dict]) -> dict:
    def mean(key: str) -> float | None:
        values = [r[key] for r in records if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {"samples": len(records), "copied_8gram_fraction": mean("copied_8gram_fraction"),
            "fully_copied_samples": sum(1 for r in records if r.get("copied_8gram_fraction") == 1.0),
            "distinct_1": mean("distinct_1"), "distinct_2": mean("distinct_2")}


# --- outputs -------------------------------------------------------------------------------------

def markdown(by_model: dict[str, list[dict]], cfg: GenerateConfig) -> str:
    settings = (f"temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}" if cfg.do_sample
                else "greedy")
    lines = ["# Samples", "", f"seed {cfg.seed}, max_new_tokens {cfg.max_new_tokens}, {settings}, "
             f"repetition_penalty {cfg.repetition_penalty}", "",
             "copied: fraction of the sample's token 8-grams found in the training blocks; "
             "distinct-2: distinct bigrams / bigrams.", ""]
    names = list(by_model)
    prompts = list(dict.fromkeys(r["prompt"] for r in by_model[names[0]]))
    for prompt in prompts:
        lines += [f"## {prompt!r}", "", "| # | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        rows = {name: [r for r in records if r["prompt"] == prompt] for name, records in by_model.items()}
        for j in range(max(len(r) for r in rows.values())):
            cells = [_cell(rows[name][j]) if j < len(rows[name]) else "" for name in names]
            lines.append(f"| {j + 1} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(r: dict) -> str:
    text = (r["prompt"] + "**" + r["text"] + "**").replace("|", "\\|").replace("\n", "<br>")
    copied = r.get("copied_8gram_fraction")
    stats = f"copied {copied:.2f}, " if copied is not None else ""
    return f"{text}<br>*{stats}distinct-2 {r['distinct_2'] or 0:.2f}*"


def public(record: dict, model: str, settings: dict) -> dict:
    return {"model": model, **{k: v for k, v in record.items() if k not in ("prompt_ids", "ids")},
            "new_tokens": len(record["ids"]), "params": settings}


def generate(params: Params, finetuned_dir: Path, base_dir: Path, data_dir: Path) -> tuple[dict, dict]:
    """Samples per model ({"finetuned": [...], "base": [...]}) and the metrics."""
    cfg = params.generate
    models = {"finetuned": finetuned_dir, **({"base": base_dir} if cfg.compare_base else {})}
    for name, path in models.items():  # both, before sampling the first
        check_folder(path, MADE_BY[name])
    prompts = load_prompts(cfg)
    check_work(len(prompts), cfg)
    train_ngrams = training_ngrams(load_saved_dataset(data_dir, "preprocess")["train"])
    by_model, metrics = {}, {}
    for name, path in models.items():
        tokenizer = load_tokenizer(path, params.model.trust_remote_code, MADE_BY[name])
        if cfg.do_sample and cfg.top_k > len(tokenizer):
            raise PipelineError(f"params: generate.top_k ({cfg.top_k}) exceeds the {len(tokenizer)} tokens of the "
                                "vocabulary; lower it, or 0 to turn top-k off")
        check_stops(cfg, tokenizer)
        model = load_model(path, params.model.trust_remote_code, sampling_dtype(cfg), made_by=MADE_BY[name])
        records, tokens_per_second = sample(model, tokenizer, prompts, cfg, label=name)
        score(records, train_ngrams)
        by_model[name] = records
        metrics[name] = {**summary(records), "tokens_per_second": tokens_per_second}
        log.info("%s: %d samples, %.0f tokens/s, copied 8-grams %s, distinct-2 %s", name, len(records),
                 tokens_per_second, _fmt(metrics[name]["copied_8gram_fraction"]), _fmt(metrics[name]["distinct_2"]))
    return by_model, metrics


SAMPLED_TOKENS_MAX = 4_000_000  # a sample stage, not a corpus generator: ~2 h on a CPU at 500 tokens/s


def check_work(prompts: int, cfg: GenerateConfig) -> None:
    """The tokens the stage would sample, bounded: counts that multiply into hours are one line up front."""
    total = prompts * cfg.num_return_sequences * cfg.max_new_tokens * (2 if cfg.compare_base else 1)
    if total > SAMPLED_TOKENS_MAX:
        raise PipelineError(f"params: generate would sample up to {total:,} tokens ({prompts:,} prompts x "
                            f"num_return_sequences {cfg.num_return_sequences} x max_new_tokens {cfg.max_new_tokens}"
                            f"{' x 2 models (compare_base)' if cfg.compare_base else ''}), over the "
                            f"{SAMPLED_TOKENS_MAX:,} of a sample stage; lower them")


def check_stops(cfg: GenerateConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """A stop string longer than any sample of max_new_tokens tokens can be never stops anything."""
    longest = max(map(len, tokenizer.get_vocab()), default=1) * cfg.max_new_tokens
    for stop in cfg.stop:
        if len(stop) > longest:
            raise PipelineError(f"params: generate.stop {stop[:30]!r}… ({len(stop):,} characters) is longer than any "
                                f"sample of {cfg.max_new_tokens} tokens can be; shorten it or raise max_new_tokens")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_outputs(by_model: dict[str, list[dict]], metrics: dict, cfg: GenerateConfig, out: Path,
                  metrics_path: Path) -> None:
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("prompts", "prompts_file")}
    with outputs(out, metrics_path) as (out_tmp, metrics_tmp):
        write_text(out_tmp / "samples.jsonl", "".join(json.dumps(public(r, name, settings)) + "\n"
                                                       for name, records in by_model.items() for r in records))
        write_text(out_tmp / "samples.md", markdown(by_model, cfg))
        write_json(metrics_tmp, metrics)


@stage_command
@params_option
@click.option("--model", "model_dir", default="models/finetuned", show_default=True, type=click.Path(path_type=Path),
              help="Model to sample from.")
@click.option("--base", "base_dir", default="models/base", show_default=True, type=click.Path(path_type=Path),
              help="Base model, sampled beside it (generate.compare_base).")
@click.option("--data", "data_dir", default="data/processed", show_default=True, type=click.Path(path_type=Path),
              help="Training blocks, for the copying check.")
@click.option("--out", default="outputs", show_default=True, type=click.Path(path_type=Path),
              help="Directory for samples.jsonl and samples.md.")
@click.option("--metrics", "metrics_path", default="metrics/generate.json", show_default=True,
              type=click.Path(path_type=Path), help="Summary: copying, repetition, tokens/s.")
@click.option("--prompt", "prompts", multiple=True,
              help="Ad hoc: sample this prompt from --model and print it; writes nothing. Repeat it for more; "
                   "'-' reads prompts from standard input, one per line (asked for one by one in a terminal).")
@click.option("--text", "texts", multiple=True,
              help="Ad hoc, for a classifier: print this text's label and probabilities; '-' reads texts from "
                   "standard input, one per line.")
@click.option("--prompts-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Ad hoc: the prompts of this file (.txt one per line, .jsonl a \"prompt\" field per line).")
@click.option("--max-new-tokens", type=int, help="Ad hoc: tokens per sample (generate.max_new_tokens).")
@click.option("--temperature", type=float, help="Ad hoc: sampling temperature (generate.temperature).")
@click.option("--top-k", type=int, help="Ad hoc: keep the k most likely tokens, 0 off (generate.top_k).")
@click.option("--top-p", type=float, help="Ad hoc: nucleus sampling mass (generate.top_p).")
@click.option("--greedy", is_flag=True, default=None, help="Ad hoc: greedy decoding, one sample per prompt.")
@click.option("--num-samples", "num_return_sequences", type=int,
              help="Ad hoc: samples per prompt (generate.num_return_sequences).")
@click.option("--repetition-penalty", type=float, help="Ad hoc: 1.0 off (generate.repetition_penalty).")
@click.option("--no-repeat-ngram-size", type=int, help="Ad hoc: never repeat an n-gram of this size, 0 off.")
@click.option("--stop", multiple=True, help="Ad hoc: cut a sample at this string (repeatable).")
@click.option("--seed", type=int, help="Ad hoc: sampling seed (generate.seed).")
@click.option("--batch-size", type=int, help="Ad hoc: samples per generate() call (generate.batch_size).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="Ad hoc: the weights' dtype while sampling (generate.precision).")
def main(params_path: str, model_dir: Path, base_dir: Path, data_dir: Path, out: Path, metrics_path: Path,
         prompts: tuple[str, ...], texts: tuple[str, ...], prompts_file: Path | None, **flags: Any) -> None:
    """Sample continuations of the prompts in params (reproducible under generate.seed), base and
    fine-tuned side by side, with copying and repetition checks. With --prompt or --prompts-file:
    sample --model ad hoc and print (settings from params.yaml, where there is one, and the flags)."""
    flags = {k: v for k, v in flags.items() if v not in (None, ())}
    if texts:
        given = [t for t in texts if t != "-"] + (list(stdin_prompts()) if "-" in texts else [])
        print_predictions(model_dir, given, ad_hoc_config(params_path, {})[1])
        return
    if prompts or prompts_file:
        ad_hoc(model_dir, list(prompts), prompts_file, *ad_hoc_config(params_path, flags))
        return
    if flags:
        name = "--" + next(iter(flags)).replace("_", "-").replace("num-return-sequences", "num-samples")
        raise PipelineError(f"{name} is for ad hoc sampling (with --prompt or --prompts-file); the stage takes its "
                            "settings from generate.* in params.yaml")
    params = load_params(params_path)
    hold_workspace("python -m pipeline.generate")  # one run per workspace (ad hoc sampling above: any time)
    take_gpus(1)  # a GPU no other run beside this one holds
    if params.task == "classification":
        records, metrics = predict(params, load_prompts(params.generate), model_dir, base_dir)
        write_predictions(records, metrics, out, metrics_path)
        return
    by_model, metrics = generate(params, model_dir, base_dir, data_dir)
    write_outputs(by_model, metrics, params.generate, out, metrics_path)


if __name__ == "__main__":
    main()
