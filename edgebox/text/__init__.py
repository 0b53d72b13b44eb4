"""Text: the tokenizer from GGUF metadata, chat templates, the sampler and stop strings."""
