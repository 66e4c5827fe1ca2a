"""Sampling from a causal LM: the generate stage's parts, and the check that prompts fit the context (the train
stage's samples use it too)."""
