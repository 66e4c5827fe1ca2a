"""Sampling from a causal LM: the generate stage's parts, and the room check the train stage's samples use."""
