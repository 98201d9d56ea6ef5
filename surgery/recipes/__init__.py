"""The recipe registry: an explicit table, one file per recipe."""

from ..errors import SurgeryError
from .base import CalibrationRequest, Recipe
from .kvsharer import KVSharer
from .matryoshka import MatryoshkaKV
from .none import Identity

RECIPES: dict[str, type[Recipe]] = {recipe.name: recipe for recipe in (Identity, KVSharer, MatryoshkaKV)}


def recipe_class(name: str) -> type[Recipe]:
    if name not in RECIPES:
        raise SurgeryError(f"unknown recipe {name!r}", hint=f"choose from {', '.join(RECIPES)}")
    return RECIPES[name]


__all__ = ["RECIPES", "CalibrationRequest", "Recipe", "recipe_class"]
