"""The functions a container can serve: FunctionBench-style, one module each
in ``guest-image/functions/``, baked into the function base image.

A container's memory cap (MiB) covers the server and its libraries: the
CZone holds its anonymous and tmpfs pages, the memcg also counts the page
cache it reads.
"""

from __future__ import annotations

from czone.errors import CZoneError

DEFAULT_MEMORY_MIB = 128

# name -> (memory cap in MiB, what it does)
FUNCTIONS: dict[str, tuple[int, str]] = {
    "float_operation": (DEFAULT_MEMORY_MIB, "sin, cos and sqrt in a loop"),
    "matmul": (DEFAULT_MEMORY_MIB, "numpy matrix product"),
    "linpack": (DEFAULT_MEMORY_MIB, "numpy linear solve, LINPACK style"),
    "json_dumps_loads": (DEFAULT_MEMORY_MIB, "JSON round trips of a local data file"),
    "pyaes": (DEFAULT_MEMORY_MIB, "AES-CTR in pure Python (pyaes)"),
    "chameleon": (DEFAULT_MEMORY_MIB, "HTML table from a Chameleon template"),
    "image_resize": (DEFAULT_MEMORY_MIB, "PIL thumbnail of a local image"),
}


def memory_for(fn: str) -> int:
    try:
        return FUNCTIONS[fn][0]
    except KeyError:
        raise CZoneError(f"unknown function {fn!r} (known: {', '.join(FUNCTIONS)})") from None
