"""Data: load raw documents -> clean -> dedup -> decontaminate -> split -> tokenize -> pack."""
