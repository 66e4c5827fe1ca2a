"""Sampling from a causal LM: batched generation with left padding and the KV cache (the same seed and
prompts give the same samples), stop strings, and the generation speed."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pipeline.core.config import GenerateConfig
from pipeline.core.device import device
from pipeline.core.loading import context_length
from pipeline.generation.room import check_room

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


def generation_config(cfg: GenerateConfig, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int | None = None
                      ) -> GenerationConfig:
    from transformers import GenerationConfig

    sampling = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p) if cfg.do_sample else {}
    return GenerationConfig(max_new_tokens=max_new_tokens or cfg.max_new_tokens, do_sample=cfg.do_sample,
                            num_return_sequences=cfg.num_return_sequences, repetition_penalty=cfg.repetition_penalty,
                            no_repeat_ngram_size=cfg.no_repeat_ngram_size, stop_strings=list(cfg.stop) or None,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            use_cache=True, **sampling)


def sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], cfg: GenerateConfig
           ) -> tuple[list[dict], float]:
    """One record per sample (prompt, sample index, continuation text and token ids), and the
    generation speed in new tokens/s. Batches are seeded by position, so the same seed and prompts
    give the same samples."""
    import torch

    dev = device()
    model.to(dev).eval()
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so every prompt ends where generation starts
    context = context_length(model.config)
    check_room(tokenizer, prompts, cfg.max_new_tokens, context, "generate")
    records, new_tokens, seconds = [], 0, 0.0
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        # an empty prompt starts from the document boundary (EOS), as in training
        texts = [p if p else tokenizer.eos_token for p in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
        room = context - inputs["input_ids"].shape[1] if context else cfg.max_new_tokens  # >= 1: check_room
        gen_config = generation_config(cfg, tokenizer, min(room, cfg.max_new_tokens))
        torch.manual_seed(cfg.seed + start)
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=gen_config, tokenizer=tokenizer)
        seconds += time.perf_counter() - began
        width = inputs["input_ids"].shape[1]
        for row, sequence in enumerate(out):
            i = row // cfg.num_return_sequences
            continuation = [t for t in sequence[width:].tolist() if t != tokenizer.pad_token_id]
            new_tokens += len(continuation)
            prompt_ids = inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist()
            records.append({"prompt": batch[i], "sample": row % cfg.num_return_sequences,
                            "text": cut_at_stop(tokenizer.decode(continuation, skip_special_tokens=True), cfg.stop),
                            "prompt_ids": prompt_ids, "ids": continuation})
    return records, new_tokens / seconds if seconds else 0.0


def cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]
