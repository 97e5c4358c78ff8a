"""CZone: memory-elastic secure containers (host agent)."""
