"""Reading the functions' payloads: a bad value raises ValueError."""


def int_param(payload, key, default, low, high):
    """payload[key] (default if absent) as an int in [low, high]."""
    value = payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{key} must be between {low} and {high}, not {value}")
    return value


def significant(x, digits=6):
    """x rounded to a few significant digits, so last-bit differences between CPUs vanish."""
    return float(f"{x:.{digits}g}")
