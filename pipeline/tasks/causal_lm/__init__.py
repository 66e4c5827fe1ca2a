"""A causal language model (task: causal_lm): continue text. The parts of each stage for that task."""
