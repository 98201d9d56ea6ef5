"""What every recipe is: options (a dataclass), a calibration request, a plan, and how the plan edits the config.

Only the planning differs between recipes; calibration, rewriting and export are shared, as in kvpress's presses.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

from surgery.base.ranges import check_ranges
from surgery.base.errors import SurgeryError

if TYPE_CHECKING:  # recipe files import no torch or transformers at module level, so `--help` stays fast
    from surgery.arch.configuration_surgery import SurgeryConfig
    from surgery.checkpoint.rewrite import TensorPlan


@dataclass(frozen=True)
class CalibrationRequest:
    """How much calibration data a recipe wants by default (its paper's setting)."""

    num_samples: int = 30
    seq_len: int = 64


@dataclass
class Recipe:
    """Base class. Subclasses are dataclasses whose fields are their CLI options (help text in field metadata)."""

    name: ClassVar[str]
    paper: ClassVar[str]
    saves: ClassVar[str]
    calibration: ClassVar[CalibrationRequest | None] = None
    distill_alpha: ClassVar[float | None] = None  # weight of KL in `surgery adapt`, from the paper when it trains
    adapt_defaults: ClassVar[dict[str, Any]] = {}  # `surgery adapt` settings the recipe needs (lr, seq_len, ...)
    renamed_options: ClassVar[dict[str, str | None]] = {}  # old recipe.yaml option -> new name (None: retired)
    milder: ClassVar[str] = ""  # what to try when the result is far from the source
    excludes: ClassVar[dict[str, str]] = {}  # recipes this one cannot be combined with, and why
    excludes_eviction: ClassVar[str | None] = None  # why no token-eviction policy can join it, if none can
    keeps_family: ClassVar[bool] = False  # True: alone (or with other such recipes), the output is a plain family checkpoint

    def __post_init__(self) -> None:
        check_ranges(self)

    def validate(self, config: SurgeryConfig) -> None:
        """Raise SurgeryError when the options cannot apply to this model."""

    def plan(self, runner, calibration_ids, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        """Decide what to change, from calibration tokens run through the source one layer at a time (`runner`, a
        LayerRunner; over no tokens when no recipe asks for calibration, but its `tensor` still reads the weights as
        the recipes before left them). Small and serialisable."""
        return {}

    def apply(self, config: SurgeryConfig, plan: dict[str, Any]) -> None:
        """Write the plan into the surgery config."""

    def describe(self, plan: dict[str, Any]) -> list[str]:
        """The plan as short readable lines for the model card."""
        return []

    def new_tensors(self) -> dict[str, Any]:
        """Tensors the plan adds to the checkpoint (bases, gates, routers), by state-dict name."""
        return {}

    def rewrite(self, plan: TensorPlan) -> None:
        """Say, tensor by tensor, how the new checkpoint differs from the source: rename, derive, drop or add.
        By default the recipe adds its `new_tensors`; tensors the planned model does not hold are dropped."""
        for name, tensor in self.new_tensors().items():
            plan.add(name, tensor)

    def is_trainable(self, name: str, config: SurgeryConfig) -> bool:
        """Whether `surgery adapt` trains this parameter of a checkpoint made with this recipe."""
        return False

    def lr_scale(self, name: str) -> float:
        """This trainable parameter's learning rate as a multiple of adapt's --lr: new parts (routers, gates) and
        pretrained weights that train beside them want rates orders of magnitude apart."""
        return 1.0

    def prepare_training(self, model) -> None:
        """Before training: e.g. parametrisations that keep trained weights valid."""

    def before_step(self, model, generator) -> None:
        """Before each micro-batch, with a generator seeded by (seed, step), so a resumed run replays it exactly."""

    def regulariser(self, model):
        """A loss term added to the distillation loss after each student forward (a tensor), or None."""
        return None

    def finish_training(self, model) -> None:
        """After training: undo what prepare_training did, leaving plain weights to export."""

    @classmethod
    def from_record(cls, options: dict[str, Any]) -> Recipe:
        """The recipe from a recipe.yaml's options, written by this or an earlier surgery (renamed options map)."""

        current = {}
        for key, value in options.items():
            key = cls.renamed_options.get(key, key)
            if key is not None:
                current[key] = value
        unknown = sorted(set(current) - {spec.name for spec in fields(cls)}, key=str)
        if unknown:
            raise SurgeryError(f"recipe.yaml gives {cls.name} options it does not take: {', '.join(map(str, unknown))}",
                               hint="remove them, or re-export the checkpoint")
        return cls(**current)

    def options(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in fields(self)}


def every_layer_slides(config: SurgeryConfig, why: str) -> SurgeryError:
    """The refusal of a recipe that acts on full-attention layers only, for a model whose every layer slides."""
    return SurgeryError(f"every layer of this {config.source_model_type or 'model'} attends within a sliding window of "
                        f"{config.sliding_window} tokens, so its cache already holds at most that many per layer: {why}",
                        hint="convert a model with full-attention layers")
