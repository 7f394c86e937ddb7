"""The `mmformer` command."""
