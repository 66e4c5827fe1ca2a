"""A text classifier (task: classification): a label per text, GPT2ForSequenceClassification. The parts of
each stage for that task."""
