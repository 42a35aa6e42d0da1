"""Exporters: physically smaller or integer models, and compressed artefacts written to disk."""

__all__: list[str] = []
