"""The generate stage for task: causal_lm: sample continuations of the prompts from the fine-tuned model
(and the base model, side by side), and check every sample for copying and repetition.

Samples are batched (left padding, KV cache), generate.batch_size at a time; the same seed, prompts and
batch_size give the same samples.
Each sample gets the fraction of its token 8-grams found in the training blocks (memorisation;
users of gpt-2-simple found their models reproducing training jokes verbatim) and distinct-1/2
(repetition). Writes outputs/samples.jsonl (one record per sample), outputs/samples.md (base and
fine-tuned side by side) and metrics/generate.json (summaries, generation tokens/s).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import GenerateConfig
from pipeline.core.errors import PipelineError
from pipeline.core.loading import MADE_BY, check_folder, load_model, load_saved_dataset, load_tokenizer
from pipeline.core.outputs import outputs, write_json, write_text
from pipeline.generation.prompts import load_prompts
from pipeline.generation.sampling import sample, sampling_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from pipeline.core.config import Params

log = logging.getLogger(__name__)
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


def generate(params: Params, model_dir: Path, base_dir: Path, data_dir: Path, out: Path, metrics_path: Path) -> None:
    """Samples of the fine-tuned (and base) model, scored, written to `out` and `metrics_path` (the stage's
    interface)."""
    by_model, metrics = sample_models(params, model_dir, base_dir, data_dir)
    write_outputs(by_model, metrics, params.generate, out, metrics_path)


def sample_models(params: Params, finetuned_dir: Path, base_dir: Path, data_dir: Path) -> tuple[dict, dict]:
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
