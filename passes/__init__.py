"""Passes: one file each, registered by name (see compressor.registry and pyproject's entry points)."""
