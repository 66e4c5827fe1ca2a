"""The GPT-2 fine-tuning pipeline. Each stage of dvc.yaml is a module here, run as `python -m pipeline.<stage>`:

    download.py     base model and tokenizer to models/base, raw data to data/raw
    preprocess.py   tokenized, packed or padded blocks to data/processed
    train.py        fine-tuned model to models/finetuned (checkpoints, dvclive, metrics/train.json)
    evaluate.py     base vs fine-tuned perplexity to metrics/eval.json
    generate.py     samples to outputs/ (and ad hoc sampling from the command line)
    report.py       the headline metrics, metrics/summary.json

Their parts live in packages beside them:

    core/        what every stage shares: the params schema (config.py) and its reading (params.py), the
                 error type and the stage command (common.py), outputs written whole (outputs.py), loading
                 what earlier stages wrote (loading.py), device and precision (device.py)
    data/        where text and models come from (sources.py, hub.py) and how records become text (records.py)
    training/    the train stage's parts: plan.py (every run decision), model.py, loss.py, memory.py,
                 throughput.py, callbacks.py, checkpoints.py, arguments.py, metrics.py, card.py, peak.py,
                 launch.py (torchrun: GPUs and hosts), sharding.py (DeepSpeed ZeRO)
    generation/  sampling (sampling.py), prompts (prompts.py), their room in the context (room.py), ad hoc
                 sampling (adhoc.py)
    tools/       commands beside the pipeline: params.py (check and describe params.yaml), recipe.py (override
                 files as experiments), publish.py (to the Hub), demo.py (make demo), plots.py
"""
