"""surgery: convert a Hugging Face LLM into a compressed architecture that loads with trust_remote_code.

The package is a ladder. A module imports only from its own layer and the layers below it, at module level and
inside functions alike, and no two modules import each other in a circle (`tests/test_layers.py` checks both).
From the bottom up, following one conversion (source -> calibrate -> plan -> rewrite -> adapt -> export -> verify):

    base/         errors, option ranges, interrupts, lazy imports, memory, safe output folders
    kernels/      Triton kernels, shipped flat in every checkpoint beside arch/
    arch/         the remote-code decoder, cache and attention core every checkpoint runs (torch, public transformers)
    checkpoint/   checkpoints as files: sources, families, GGUF, tensor I/O, layouts, rewrite, export, records, card,
                  hub, verify
    calibrate/    calibration text and the layer-by-layer runner
    metrics/      what recipes' searches and the evals both measure with
    train/        training primitives: LoRA, Cayley rotations, load balancing, the teacher
    recipes/      one converter module per recipe, one registry table, shared helpers
    evals/        the eval commands: perplexity, pass key, retrieval, lm-eval, compare
    adapt/        the distillation engine
    pipelines/    convert and replay, one function each over an options object
    cli/          one module per command, shared option groups declared once
"""

__version__ = "0.1.0"

LADDER = ("base", "kernels", "arch", "checkpoint", "calibrate", "metrics", "train", "recipes", "evals", "adapt",
          "pipelines", "cli")
