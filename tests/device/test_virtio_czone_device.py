"""The virtio-czone-pci device in our QEMU, driven without a guest kernel.

``qmp_check.py`` covers properties, QMP and bad ``-device`` options;
``vq_poke.py`` plays the guest driver over QEMU's qtest protocol and sends
real requests, including every malformed one; ``vq_harden.py`` checks S3,
backends, prealloc, discards disabled and a stats storm.  Each prints PASS/FAIL
lines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from czone import artifacts as art

HERE = Path(__file__).parent


@pytest.mark.parametrize("script", ["qmp_check.py", "vq_poke.py", "vq_harden.py"])
def test_device_script(script: str) -> None:
    try:
        qemu = art.qemu_binary()
    except art.ArtifactMissing as e:
        pytest.fail(str(e), pytrace=False)
    # Its own process group: whatever QEMU the script started dies with it.
    proc = subprocess.Popen([sys.executable, str(HERE / script), str(qemu)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    fails = [line for line in out.splitlines() if line.startswith("FAIL ")]
    assert proc.returncode == 0 and not fails, out
    assert "FAILURES: 0" in out, out
