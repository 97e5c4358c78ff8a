"""FunctionBench pyaes: AES-CTR encrypt, then decrypt, a message with a fixed key."""

import hashlib
import string

import pyaes  # the library: fnserver puts this directory last on sys.path
from fnparams import int_param

DEFAULT_PAYLOAD = {"length_of_message": 2000, "num_of_iterations": 1}
KEY = b"\xa1\xf6%\x8c\x87}_\xcd\x89dHE8\xbf\xc9,"
LETTERS = (string.ascii_lowercase + string.digits).encode()


def handle(payload):
    length = int_param(payload, "length_of_message", DEFAULT_PAYLOAD["length_of_message"],
                       0, 10_000_000)
    iterations = int_param(payload, "num_of_iterations", DEFAULT_PAYLOAD["num_of_iterations"],
                           1, 10_000)
    message = bytes(LETTERS[(i * 7919) % len(LETTERS)] for i in range(length))
    for _ in range(iterations):
        ciphertext = pyaes.AESModeOfOperationCTR(KEY).encrypt(message)
        plaintext = pyaes.AESModeOfOperationCTR(KEY).decrypt(ciphertext)
    return {"length": length, "sha256": hashlib.sha256(ciphertext).hexdigest(),
            "round_trip": plaintext == message}
