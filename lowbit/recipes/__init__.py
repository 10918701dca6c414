"""Recipes: rules that say which quantizer touches which tensor of which op, and the named recipes.

Flax-free: ``lowbit.nn`` finds a model's ops and asks a ``Recipe`` which ``Rule``
quantizes each; ``lowbit.recipes.op`` applies a rule to one op's operands.
"""

from lowbit.recipes.registry import get, names, resolve
from lowbit.recipes.rules import KINDS, OpInfo, Recipe, Rule

__all__ = ["KINDS", "OpInfo", "Recipe", "Rule", "get", "names", "resolve"]
