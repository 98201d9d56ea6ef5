"""The recipe registry: an explicit table, one file per recipe."""

from surgery.base.errors import SurgeryError
from surgery.recipes.adamoe import AdaMoE
from surgery.recipes.attention_gate import AttentionGateRecipe
from surgery.recipes.base import CalibrationRequest, Recipe
from surgery.recipes.depth_up import DepthUp
from surgery.recipes.dynamickv import DynamicKV
from surgery.recipes.h2o import H2O
from surgery.recipes.kvsharer import KVSharer
from surgery.recipes.lesa import LESA
from surgery.recipes.matryoshka import MatryoshkaKV
from surgery.recipes.modification import MoDification
from surgery.recipes.none import Identity
from surgery.recipes.pod import PoD
from surgery.recipes.pyramid import PyramidKV
from surgery.recipes.snapkv import SnapKV
from surgery.recipes.streamingllm import StreamingLLM
from surgery.recipes.upcycle import Upcycle
from surgery.recipes.zigzag import ZigZagKV
from surgery.recipes.budget import TokenBudgetRecipe

# Registry order is composition order: depth growth first (later recipes plan on the grown model), then experts
# (upcycling, then null experts), sharing, projections, key sharing, learned eviction, routing, then token eviction.
RECIPES: dict[str, type[Recipe]] = {
    recipe.name: recipe for recipe in (Identity, LESA, DepthUp, Upcycle, AdaMoE, KVSharer, MatryoshkaKV, PoD,
                                       AttentionGateRecipe,
                                       MoDification, SnapKV, PyramidKV, ZigZagKV, DynamicKV,
                                       StreamingLLM, H2O)
}


def recipe_class(name: str) -> type[Recipe]:
    if name not in RECIPES:
        raise SurgeryError(f"unknown recipe {name!r}", hint=f"choose from {', '.join(RECIPES)}")
    return RECIPES[name]


def recipes_from_record(record: dict) -> list[Recipe]:
    """The recipes a checkpoint's recipe.yaml names, with their options; a malformed record is one clear line."""
    entries = record.get("recipes") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries):
        raise SurgeryError("recipe.yaml lists its recipes in an unknown form", hint="re-export the checkpoint")
    recipes = []
    for entry in entries:
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise SurgeryError(f"recipe.yaml gives {entry['name']} options that are not a mapping", hint="re-export the checkpoint")
        recipes.append(recipe_class(entry["name"]).from_record(options))
    return recipes


def check_composition(recipes: list[Recipe]) -> None:
    """Recipes compose in registry order (e.g. kvsharer before matryoshka: projections are fitted to the owners),
    each at most once, and with at most one token-eviction policy."""

    order = list(RECIPES)
    names = [recipe.name for recipe in recipes]
    if len(set(names)) != len(names):
        raise SurgeryError(f"recipe listed twice: {','.join(names)}", hint="list each recipe once")
    policies = [recipe.name for recipe in recipes if isinstance(recipe, TokenBudgetRecipe)]
    if len(policies) > 1:
        raise SurgeryError(f"{' and '.join(policies)} are both token-eviction policies; a model evicts with one",
                           hint="pick one of them")
    for recipe in recipes:
        if recipe.excludes_eviction and policies:
            raise SurgeryError(f"{recipe.name} cannot be combined with {policies[0]}: {recipe.excludes_eviction}",
                               hint=f"convert with {recipe.name} or with {policies[0]}, not both")
        for other, reason in recipe.excludes.items():
            if other in names:
                raise SurgeryError(f"{recipe.name} cannot be combined with {other}: {reason}",
                                   hint=f"convert with {recipe.name} or with {other}, not both")
    expected = sorted(names, key=order.index)
    if names != expected:
        raise SurgeryError(f"recipes must be listed as {','.join(expected)}", hint="reorder --recipe")


__all__ = ["RECIPES", "CalibrationRequest", "Recipe", "check_composition", "recipe_class", "recipes_from_record"]
