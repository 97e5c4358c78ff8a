"""FunctionBench float_operation: sin, cos and sqrt of 0..n-1."""

import math

from fnparams import int_param

DEFAULT_PAYLOAD = {"n": 100000}


def handle(payload):
    n = int_param(payload, "n", DEFAULT_PAYLOAD["n"], 0, 100_000_000)
    sin_sum = cos_sum = sqrt_sum = 0.0
    for i in range(n):
        sin_sum += math.sin(i)
        cos_sum += math.cos(i)
        sqrt_sum += math.sqrt(i)
    # libm's sin/cos may differ in the last bit between CPUs (FMA or not): round.
    return {"n": n, "sin_sum": round(sin_sum, 6), "cos_sum": round(cos_sum, 6),
            "sqrt_sum": round(sqrt_sum, 3)}
