"""Exceptions shared by the host agent; each carries the context to act on."""


class CZoneError(Exception):
    """Base class: the CLI prints these as one clear message, never a traceback."""
