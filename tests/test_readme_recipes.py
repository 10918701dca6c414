"""README's recipe table is the registry's: one row per named recipe, from its summary."""

from pathlib import Path

from lowbit import recipes

README = Path(__file__).resolve().parent.parent / "README.md"


def recipe_table() -> str:
    """The Markdown table of every named recipe, from ``Recipe.summary``."""
    rows = ["| recipe | what gets which format |", "|---|---|"]
    for name in recipes.names():
        cells = "; ".join(f"**{tensor}**: {fmt}" for tensor, fmt in recipes.get(name).summary)
        rows.append(f"| `{name}` | {cells.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def test_readme_recipe_table_is_generated_from_the_registry():
    assert recipe_table() in README.read_text(), "regenerate: python -c 'from tests.test_readme_recipes import ...'"
