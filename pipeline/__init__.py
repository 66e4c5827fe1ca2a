"""The GPT-2 fine-tuning pipeline. Each stage of dvc.yaml is a module here, run as `python -m pipeline.<stage>`,
a driver that reads its params, calls its task's part and writes its declared outputs:

    download.py     base model and tokenizer to models/base, raw data to data/raw
    preprocess.py   the records as blocks to data/processed
    train.py        fine-tuned model to models/finetuned (checkpoints, dvclive, metrics/train.json)
    evaluate.py     the fine-tuned model beside the base model, metrics/eval.json
    generate.py     samples or predictions to outputs/ (and ad hoc sampling from the command line)
    report.py       the headline metrics, metrics/summary.json

Their parts live in packages beside them:

    tasks/       what differs by task, a package per task (a language model, a classifier) with a module
                 per stage; the tasks, their interface and the lookup (task_part) in tasks/__init__.py
    core/        what every stage stands on, importing nothing else of the pipeline: the params schema
                 (config.py) and its reading (params.py), the error type (errors.py), the stage command
                 (cli.py) and its preamble (preamble.py), one run per workspace (workspace.py), where inputs
                 lie (locations.py), outputs written whole (outputs.py), loading what earlier stages wrote
                 (loading.py), device and precision (device.py), small shared values (common.py)
    data/        where text and models come from (sources.py, hub.py), how records become text (records.py),
                 the train/validation split (splits.py), text lengths (lengths.py)
    training/    the train stage's task-free parts, one home per concept: plan.py (steps, precision, compile),
                 attention.py, memory/ (estimate.py before the run, peak.py as it ran), throughput.py,
                 distributed/ (launch.py: torchrun, GPUs and hosts; sharding.py: DeepSpeed ZeRO),
                 checkpoints.py, callbacks.py, card.py (the card's lineage), model.py, loss.py, arguments.py
                 (the Trainer's arguments), metrics.py (the run's figures)
    generation/  sampling a language model (sampling.py), prompts (prompts.py), whether they fit the context
                 (fit.py), ad hoc sampling and classifying (adhoc.py)
    tools/       commands beside the pipeline: params.py (check and describe params.yaml), recipe.py (override
                 files as experiments), publish.py (to the Hub), demo.py (make demo), plots.py
"""
