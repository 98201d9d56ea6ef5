"""Triton kernels for the attention layouts a plan creates. Bundled flat into checkpoints beside `arch/`."""
