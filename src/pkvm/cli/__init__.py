"""The `pkvm` command line."""
