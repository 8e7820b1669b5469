"""Lethe's service side: the ``lethe`` command, and later the API, registry and dashboard."""
