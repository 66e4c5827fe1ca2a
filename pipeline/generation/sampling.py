"""Sampling from a causal LM: batched generation with left padding and the KV cache (the same seed,
prompts and batch_size give the same samples), stop strings, progress lines, and the generation speed.

transformers' sampling draws every token from the whole vocabulary: a softmax, a full sort for top-p
and a multinomial over 50,257 tokens per sequence per step, although top_k leaves 50 candidates; at a
thousand samples that costs more than the model. Here generate() decodes greedily over the scores
`SampleTopK` leaves: it draws the token among the top_k candidates alone (temperature and top-p applied
to them by transformers' own warpers, so the distribution is the one transformers samples) and leaves
only that token standing. With top_k 0 it draws over the whole vocabulary exactly as transformers does.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pipeline.core.config import GenerateConfig
from pipeline.core.device import autocast_dtype, device, resolve_precision
from pipeline.core.loading import context_length
from pipeline.generation.fit import check_prompts_fit

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def sampling_dtype(cfg: GenerateConfig) -> torch.dtype | None:
    """The dtype the weights sample in (None: fp32): generate.precision, resolved for this device. The
    weights are cast, not autocast: decoding reads every weight once per token, and autocast would
    cast each of them again every step."""
    return autocast_dtype(resolve_precision(cfg.precision, "generate.precision"))


def generation_config(cfg: GenerateConfig, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int
                      ) -> GenerationConfig:
    """transformers' settings for one generate() call: greedy over the scores the processors leave
    (SampleTopK does the sampling); one sequence per input row (the rows are the samples)."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_return_sequences=1,
                            repetition_penalty=cfg.repetition_penalty, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)


class SampleTopK:
    """A logits processor that samples the next token and leaves only it standing (0, the rest -inf),
    so generate()'s greedy step picks it. With top_k, only the k most likely tokens are warped and
    drawn from: nothing is sorted or sampled over the whole vocabulary."""

    def __init__(self, temperature: float, top_k: int, top_p: float) -> None:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        self.top_k = top_k
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def candidates(self, input_ids: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The probabilities to draw from and, with top_k, the token ids they belong to (None: the
        whole vocabulary, in its order)."""
        if not self.top_k:
            return self.warpers(input_ids, scores).softmax(dim=-1), None
        top, ids = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1)  # sorted: top-p then sorts k, not 50,257
        return self.warpers(input_ids, top).softmax(dim=-1), ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        probs, ids = self.candidates(input_ids, scores)
        choice = torch.multinomial(probs, num_samples=1)
        token = ids.gather(-1, choice) if ids is not None else choice
        return scores.fill_(float("-inf")).scatter_(-1, token, 0.0)  # scores is generate()'s own copy


class StopStrings:
    """A stopping criterion: a sample ends at the step its new text comes to contain a stop string.

    transformers' StopStringCriteria first builds a table over every vocabulary token for each stop
    string (on GPT-2's vocabulary about a second for one two-character string, minutes for a few dozen
    longer ones); decoding the last few tokens of each sample per step costs microseconds instead."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: list[str], prompt_width: int) -> None:
        self.tokenizer, self.stops, self.prompt_width = tokenizer, stops, prompt_width
        self.window = 4 * max(map(len, stops)) + 1  # a character is at most 4 byte-level tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs: object) -> torch.Tensor:
        import torch

        tails = input_ids[:, max(self.prompt_width, input_ids.shape[1] - self.window):].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(stop in text for stop in self.stops) for text in texts], device=input_ids.device)


class Progress:
    """A logits processor that changes nothing: it counts the steps generate() takes and logs the
    samples done, tokens/s and the time left (if every sample runs to max_new_tokens), first after
    FIRST_S seconds, then every EVERY_S (a thousand samples take minutes; a silent stage looks hung).
    No device sync: it reads shapes only."""

    FIRST_S, EVERY_S = 5.0, 30.0

    def __init__(self, label: str, samples: int, max_new_tokens: int) -> None:
        self.label, self.samples, self.max_new_tokens = label, samples, max_new_tokens
        self.began = time.perf_counter()
        self.next_at = self.began + self.FIRST_S
        self.samples_done = self.tokens = self.tokens_in_batch = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.tokens += scores.shape[0]
        self.tokens_in_batch += scores.shape[0]
        now = time.perf_counter()
        if now >= self.next_at:
            self.next_at = now + self.EVERY_S
            rate = self.tokens / (now - self.began)
            left = (self.samples - self.samples_done) * self.max_new_tokens - self.tokens_in_batch
            log.info("%s: %d/%d samples, %s tokens/s, ETA %s", self.label, self.samples_done, self.samples,
                     f"{rate:,.0f}", clock(left / rate))
        return scores

    def batch_done(self, samples: int) -> None:
        self.samples_done += samples
        self.tokens_in_batch = 0


def clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def padding_alarm(record: logging.LogRecord) -> bool:
    """False for GPT-2's "we strongly recommend passing in an attention_mask" warning: generate() leaves
    the mask out when no prompt of a batch is padded (correctly), and then the pad tokens of samples that
    have ended set it off."""
    return "recommend passing in an `attention_mask`" not in record.getMessage()


def sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], cfg: GenerateConfig,
           label: str = "generate") -> tuple[list[dict], float]:
    """One record per sample (prompt, sample index, continuation text and token ids), and the
    generation speed in new tokens/s. The samples (num_return_sequences per prompt) go through the
    model cfg.batch_size at a time, each batch seeded by its position, so the same seed, prompts and
    batch_size give the same samples."""
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    logging.getLogger("transformers.modeling_utils").addFilter(padding_alarm)  # added once, however often called
    dev = device()
    model.to(dev).eval()
    tokenizer.padding_side = "left"  # decoder-only: pad on the left so every prompt ends where generation starts
    context = context_length(model.config)
    check_prompts_fit(tokenizer, prompts, cfg.max_new_tokens, context, "generate")
    rows = [(i, j) for i in range(len(prompts)) for j in range(cfg.num_return_sequences)]
    progress = Progress(label, len(rows), cfg.max_new_tokens)
    processors = LogitsProcessorList([progress] + ([SampleTopK(cfg.temperature, cfg.top_k, cfg.top_p)]
                                                   if cfg.do_sample else []))
    records, new_tokens, seconds = [], 0, 0.0
    for start in range(0, len(rows), cfg.batch_size):
        batch = [prompts[i] for i, _ in rows[start:start + cfg.batch_size]]
        # an empty prompt starts from the document boundary (EOS), as in training
        inputs = tokenizer([p if p else tokenizer.eos_token for p in batch], return_tensors="pt", padding=True,
                           add_special_tokens=False).to(dev)
        width = inputs["input_ids"].shape[1]
        left = context - width if context else cfg.max_new_tokens  # >= 1: check_prompts_fit
        settings = generation_config(cfg, tokenizer, min(left, cfg.max_new_tokens))
        stops = StoppingCriteriaList([StopStrings(tokenizer, list(cfg.stop), width)] if cfg.stop else [])
        torch.manual_seed(cfg.seed + start)
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=settings, logits_processor=processors,
                                 stopping_criteria=stops)
        seconds += time.perf_counter() - began
        progress.batch_done(len(batch))
        for row, (sequence, (_, j)) in enumerate(zip(out, rows[start:start + cfg.batch_size], strict=True)):
            continuation = [t for t in sequence[width:].tolist() if t != tokenizer.pad_token_id]
            new_tokens += len(continuation)
            prompt_ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
            records.append({"prompt": batch[row], "sample": j,
                            "text": cut_at_stop(tokenizer.decode(continuation, skip_special_tokens=True), cfg.stop),
                            "prompt_ids": prompt_ids, "ids": continuation})
    return records, new_tokens / seconds if seconds else 0.0


def cut_at_stop(text: str, stops: list[str]) -> str:
    cut = min((text.index(s) for s in stops if s in text), default=len(text))
    return text[:cut]
