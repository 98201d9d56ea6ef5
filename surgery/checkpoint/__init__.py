"""Checkpoints as files: sources, families, GGUF, tensor I/O, layouts, rewrite, export, records, card, hub, verify."""
