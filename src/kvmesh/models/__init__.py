"""Demo models (random weights, shipped tokenizer)."""
