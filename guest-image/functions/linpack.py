"""FunctionBench linpack: solve Ax = b for a random A, with b chosen so x is all ones."""

import numpy as np
from fnparams import int_param, significant

DEFAULT_PAYLOAD = {"n": 200, "seed": 42}


def handle(payload):
    n = int_param(payload, "n", DEFAULT_PAYLOAD["n"], 1, 4000)
    seed = int_param(payload, "seed", DEFAULT_PAYLOAD["seed"], 0, 2**63 - 1)
    a = np.random.default_rng(seed).random((n, n)) - 0.5
    b = a.sum(axis=1)
    x = np.linalg.solve(a, b)
    # LINPACK's normalised residual: O(1) for a backward-stable solve.
    residual = np.linalg.norm(a @ x - b, np.inf) / (
        n * np.linalg.norm(a, np.inf) * np.linalg.norm(x, np.inf) * np.finfo(float).eps)
    return {"n": n, "residual_ok": bool(residual.item() < 100.0),
            "checksum": significant(x.sum().item())}
