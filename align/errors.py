class AlignError(Exception):
    """An error the user fixes by changing a recipe, a file or a setting; the CLI prints its message without a
    traceback. Each module defines its own kind (RecipeError, DataError, ModelLoadError)."""
