"""The train stage's parts: the plan (every run decision), the model as it trains, its loss, memory,
throughput, callbacks, checkpoints, the Trainer's arguments, the metrics and the model card."""
