"""Evaluation: benchmark tasks in lm-evaluation-harness's formats, perplexity, hallucination checks."""
