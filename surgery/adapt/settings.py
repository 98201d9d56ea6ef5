"""The options of `surgery adapt`, apart from the trainer so that `surgery adapt --help` imports no torch."""

from dataclasses import dataclass, field, replace

from surgery.base.ranges import check_ranges


@dataclass
class AdaptSettings:
    """Training settings; recorded in recipe.yaml under `adapt`."""

    teacher: str
    data: str | None = field(default=None, metadata={"help": "training text, as convert's --calib [stdlib-docstrings]"})
    steps: int = field(default=200, metadata={"help": "optimizer steps", "min": 1})
    batch_size: int | None = field(default=None, metadata={"help": "sequences per micro-batch (per process) (default: the recipe's, else 8)", "min": 1})
    seq_len: int | None = field(default=None, metadata={"help": "tokens per sequence (default: the recipe's, else 128)", "min": 2})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step", "min": 1})
    num_samples: int = field(default=256, metadata={"help": "training sequences drawn from the data", "min": 1})
    lr: float | None = field(default=None, metadata={"help": "AdamW learning rate (default: the recipe's, else 1e-3)", "above": 0})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup before the cosine decay", "min": 0})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay", "min": 0})
    alpha: float | None = field(default=None, metadata={"help": "weight of KL vs CE (default: the recipe paper's)", "min": 0, "max": 1})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)", "min": 0})
    mixed_precision: str = field(default="auto", metadata={"help": "bf16 autocast: auto (bf16 on CUDA), bf16 or no",
                                                           "choices": ("auto", "bf16", "no")})
    save_every: int = field(default=50, metadata={"help": "steps between resumable checkpoints (0: never)", "min": 0})
    lora_rank: int = field(default=0, metadata={"help": "train whole projections as LoRA updates of this rank (0: in full)", "min": 0})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scale numerator (default: 2 × --lora-rank)", "above": 0})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward to save memory", "flag": True})
    copy_teacher: bool = field(default=False, metadata={"help": "load the teacher as its own full copy instead of sharing the student's frozen tensors", "flag": True})
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges(self)

    def for_recipes(self, recipes: list) -> "AdaptSettings":
        """These settings with what the user left unset taken from the first recipe that needs its own value, else
        adapt's defaults."""
        resolved = {}
        for name, default in FALLBACKS.items():
            if getattr(self, name) is None:
                resolved[name] = next((r.adapt_defaults[name] for r in recipes if name in r.adapt_defaults), default)
        return replace(self, **resolved)


FALLBACKS = {"lr": 1e-3, "batch_size": 8, "seq_len": 128}  # adapt's defaults where neither user nor recipe says
