"""The `dicomai` command."""
