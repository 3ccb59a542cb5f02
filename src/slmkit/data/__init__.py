"""Data: read raw text, filter and de-duplicate it, split, tokenize and pack it (prepare); serve
training and validation batches from the packed shards (loader)."""
