"""Commands beside the pipeline's stages: checking params, recipes as experiments, publishing, the demo, plots."""
