"""Write expected.json: each function's result for its default payload, and a bad payload.

Run with Debian's python3 and libraries (those of the guest):
    /usr/bin/python3 guest-image/functions/make_expected.py
Each function runs twice, each time in a fresh process; different results are an error.
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BAD_PAYLOADS = {
    "float_operation": {"n": -1},
    "matmul": {"n": 0},
    "linpack": {"n": -1},
    "json_dumps_loads": {"repeat": 0},
    "pyaes": {"length_of_message": -1},
    "chameleon": {"num_of_rows": -1},
    "image_resize": {"width": 0},
}
CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import fnserver
module = fnserver.load_function(sys.argv[2])
try:
    module.handle(json.loads(sys.argv[3]))
    error = None
except ValueError as exc:
    error = fnserver.error_text(exc)
print(json.dumps({"default_payload": module.DEFAULT_PAYLOAD,
                  "result": module.handle(dict(module.DEFAULT_PAYLOAD)),
                  "bad_payload": json.loads(sys.argv[3]), "bad_error": error}))
"""


def run(name):
    out = subprocess.run([sys.executable, "-c", CHILD, HERE, name,
                          json.dumps(BAD_PAYLOADS[name])],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    return json.loads(out)


def main():
    expected = {}
    for name in BAD_PAYLOADS:
        first, second = run(name), run(name)
        if first != second:
            sys.exit(f"{name} is not deterministic: {first} != {second}")
        if first["bad_error"] is None:
            sys.exit(f"{name} accepted the bad payload {BAD_PAYLOADS[name]}")
        expected[name] = first
        print(name, json.dumps(first["result"]))
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
