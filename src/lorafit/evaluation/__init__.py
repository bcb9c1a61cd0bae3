"""Evaluation: perplexity and side-by-side generations."""
