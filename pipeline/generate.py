"""Stage 5, generate: what the fine-tuned model makes of the prompts in params, beside the base model
(pipeline.tasks.<task>.generate): a language model's samples, checked for copying and repetition
(outputs/samples.jsonl, samples.md), a classifier's labels with their probabilities (outputs/
predictions.jsonl, predictions.md); their summary in metrics/generate.json.

Ad hoc, on any model directory, printing to the terminal (every sampling setting has a flag; '-'
reads prompts from standard input, one at a time in a terminal):
    python -m pipeline.generate --model models/finetuned --prompt "The history of" --temperature 0.7
    python -m pipeline.generate --prompt - --greedy --max-new-tokens 40
    python -m pipeline.generate --model models/finetuned --text "A text to label"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pipeline.core.cli import params_option, stage_command
from pipeline.core.errors import PipelineError
from pipeline.core.preamble import start_stage
from pipeline.generation.adhoc import ad_hoc, ad_hoc_config, ad_hoc_texts
from pipeline.tasks import task_part


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
        ad_hoc_texts(model_dir, list(texts), params_path)
        return
    if prompts or prompts_file:
        ad_hoc(model_dir, list(prompts), prompts_file, *ad_hoc_config(params_path, flags))
        return
    if flags:
        name = "--" + next(iter(flags)).replace("_", "-").replace("num-return-sequences", "num-samples")
        raise PipelineError(f"{name} is for ad hoc sampling (with --prompt or --prompts-file); the stage takes its "
                            "settings from generate.* in params.yaml")
    params = start_stage("generate", params_path, gpus=1)  # (ad hoc sampling above: any time, no workspace)
    task_part(params.task, "generate").generate(params, model_dir, base_dir, data_dir, out, metrics_path)


if __name__ == "__main__":
    main()
