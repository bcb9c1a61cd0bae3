"""Adapters as products: saved in the PEFT format with lorafit metadata."""
