"""The recipe registry: an explicit table, one file per recipe."""

from ..errors import SurgeryError
from .base import CalibrationRequest, Recipe
from .dynamickv import DynamicKV
from .kvsharer import KVSharer
from .matryoshka import MatryoshkaKV
from .none import Identity
from .pyramid import PyramidKV
from .snapkv import SnapKV
from .zigzag import ZigZagKV

# Registry order is composition order: sharing first, then projections, then token eviction.
RECIPES: dict[str, type[Recipe]] = {
    recipe.name: recipe for recipe in (Identity, KVSharer, MatryoshkaKV, SnapKV, PyramidKV, ZigZagKV, DynamicKV)
}


def recipe_class(name: str) -> type[Recipe]:
    if name not in RECIPES:
        raise SurgeryError(f"unknown recipe {name!r}", hint=f"choose from {', '.join(RECIPES)}")
    return RECIPES[name]


__all__ = ["RECIPES", "CalibrationRequest", "Recipe", "recipe_class"]
