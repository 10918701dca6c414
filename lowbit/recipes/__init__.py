"""Recipes: which quantizer touches which tensor of which op, and the registry of named recipes."""

from lowbit.recipes.registry import LayerRecipe, Recipe, get, names

__all__ = ["LayerRecipe", "Recipe", "get", "names"]
