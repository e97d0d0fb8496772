"""Locally built models (seeded random weights, a locally trained tokenizer)."""
