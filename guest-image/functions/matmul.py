"""FunctionBench matmul: the product of two random n x n matrices."""

import numpy as np
from fnparams import int_param, significant

DEFAULT_PAYLOAD = {"n": 200, "seed": 42}


def handle(payload):
    n = int_param(payload, "n", DEFAULT_PAYLOAD["n"], 1, 4000)
    seed = int_param(payload, "seed", DEFAULT_PAYLOAD["seed"], 0, 2**63 - 1)
    rng = np.random.default_rng(seed)
    a = rng.random((n, n))
    b = rng.random((n, n))
    c = a @ b
    return {"shape": list(c.shape), "trace": significant(np.trace(c).item()),
            "checksum": significant(c.sum().item())}
