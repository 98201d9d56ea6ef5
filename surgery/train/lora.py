"""Low-rank updates (peft's LoRA) for recipes that train whole projections, such as KVSharer's q_proj/o_proj.

With `surgery adapt --lora-rank R`, each trainable nn.Linear weight stays frozen, so the teacher shares it, and
trains W + (α/R)·B·A instead: 2·R·(in + out) parameters and their optimiser state rather than in·out. Trainable
tensors that are not Linear weights (MatryoshkaKV's bases) still train directly. Before export the updates are
merged, so the checkpoint holds plain weights in the recipe's architecture and loads without peft.
"""

from torch import nn


def linear_targets(model: nn.Module, trainable: set[str]) -> list[str]:
    """The Linear modules whose weight is trainable: where LoRA goes."""
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and f"{name}.weight" in trainable)


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float) -> None:
    """Wrap each target Linear in a LoRA layer (B starts at zero, so the model is unchanged until trained)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, model)


def is_lora_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight and put the plain Linear back in its place."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
