"""The memory model of the hybrid loop (issue 4): a small KV-cached transformer with its own
tokenizer that condenses chain-of-thought. Not implemented yet; the package exists so the
artifact/server layout is final and the Docker image copies a stable tree."""
