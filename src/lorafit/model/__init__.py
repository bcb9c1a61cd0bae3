"""Base models: the embedded default, local folders, GGUF files and hub ids; LoRA setup."""
