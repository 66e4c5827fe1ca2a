"""Text classification with GPT-2 (task: classification): the parts of each stage for that task."""
