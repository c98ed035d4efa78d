"""The `xcit` command line."""
