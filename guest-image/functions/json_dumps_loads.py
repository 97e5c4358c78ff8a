"""FunctionBench json_dumps_loads, on a document built here instead of downloaded.

The document (about 200 KB of JSON) is derived from sha256 digests, so it is
the same on every machine and Python version, and nothing big is committed.
"""

import hashlib
import json

from fnparams import int_param

DEFAULT_PAYLOAD = {"repeat": 2}
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
         "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]


def record(i):
    d = hashlib.sha256(b"czone-%d" % i).digest()
    return {
        "id": i,
        "name": " ".join(WORDS[b % len(WORDS)] for b in d[:3]),
        "active": d[3] % 2 == 0,
        "score": int.from_bytes(d[4:8], "big") / 2**32,
        "tags": [WORDS[b % len(WORDS)] for b in d[8:8 + d[8] % 5]],
        "location": {"lat": d[9] - 128 + d[10] / 256, "lon": d[11] - 128 + d[12] / 256},
        "digest": d[16:].hex(),
        "parent": None if i < 16 else i // 16,
    }


DOCUMENT = json.dumps({"version": 1, "records": [record(i) for i in range(800)]})


def handle(payload):
    repeat = int_param(payload, "repeat", DEFAULT_PAYLOAD["repeat"], 1, 10_000)
    text = DOCUMENT
    for _ in range(repeat):
        text = json.dumps(json.loads(text))
    return {"length": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}
