"""Commands beyond run/serve: bench, perplexity, info, plan."""
