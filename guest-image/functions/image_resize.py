"""FunctionBench image processing: resize a picture made here, so nothing is committed."""

import hashlib

from fnparams import int_param
from PIL import Image

DEFAULT_PAYLOAD = {"width": 160, "height": 120}
SIZE = (640, 480)
# Gradients and a Mandelbrot set: PIL draws them the same way on every machine.
PICTURE = Image.merge("RGB", (
    Image.linear_gradient("L").resize(SIZE, Image.Resampling.NEAREST),
    Image.radial_gradient("L").resize(SIZE, Image.Resampling.NEAREST),
    Image.effect_mandelbrot(SIZE, (-2.0, -1.2, 0.8, 1.2), 64),
))


def handle(payload):
    width = int_param(payload, "width", DEFAULT_PAYLOAD["width"], 1, 4096)
    height = int_param(payload, "height", DEFAULT_PAYLOAD["height"], 1, 4096)
    # Bicubic weights are polynomials; Lanczos would depend on libm's sin.
    resized = PICTURE.resize((width, height), Image.Resampling.BICUBIC)
    return {"size": list(resized.size), "sha256": hashlib.sha256(resized.tobytes()).hexdigest()}
