"""The distillation engine that trains whatever the recipes mark trainable."""
