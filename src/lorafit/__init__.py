"""lorafit: adapt Llama-family language models to a domain with LoRA."""

__version__ = "0.1.0"
