"""The `colocate` command line (core commands; client packages register theirs by entry point)."""
