"""Config: the typed tree, YAML in and out, overrides, error formatting."""
