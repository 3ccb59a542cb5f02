"""Adapters: LoRA / DoRA layers over float or quantized linears, PEFT-format files, merging."""
