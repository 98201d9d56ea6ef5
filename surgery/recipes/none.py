"""The identity recipe: the surgery architecture with an empty plan, equal to the source model."""

from dataclasses import dataclass

from surgery.recipes.base import Recipe


@dataclass
class Identity(Recipe):
    name = "none"
    paper = "-"
    saves = "nothing: reproduces the source model exactly"
