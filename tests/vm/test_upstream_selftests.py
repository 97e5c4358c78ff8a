"""Linux's own selftests, built from our patched tree, still pass in the guest."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.vm


@pytest.mark.parametrize("suite", ["clone3", "memory-hotplug"])
def test_upstream_selftests(microvm_factory, suite: str) -> None:
    # movablecore gives the hot-plug test memory blocks it may offline.
    vm = microvm_factory.boot("selftests", memory_mib=1024, extra_append="movablecore=256M")
    with vm.ssh() as ssh:
        out = ssh.run(f"cd /opt/selftests && ./run_kselftest.sh -c {suite} 2>&1",
                      timeout=600).stdout
    results = re.findall(r"^(ok|not ok) \d+ selftests: (\S+): (\S+)(.*)$", out, re.M)
    assert results, f"no TAP results from {suite}:\n{out}"
    failed = [r for r in results if r[0] != "ok" or "# SKIP" in r[3]]
    assert not failed, f"{suite}: {failed}\n{out}"
