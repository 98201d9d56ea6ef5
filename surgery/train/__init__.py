"""Training primitives: LoRA, Cayley rotations, the load-balancing loss, the shared-weight teacher."""
