"""The CZone kernel series, exercised in a real guest by our C test programs."""

from __future__ import annotations

import re

import pytest

from tests.vm.guest import CZONE_VM, assert_dmesg_clean, run_program

pytestmark = pytest.mark.vm

FUZZ_SEED = 20261127
FUZZ_ITERATIONS = 10_000


@pytest.fixture
def czone_vm(microvm_factory):
    return microvm_factory.boot("czone", **CZONE_VM)


@pytest.mark.parametrize("program", ["czone_place", "czone_errors", "czone_oom",
                                     "czone_hotplug", "czone_remote", "czone_thp",
                                     "czone_dying"])
def test_in_guest_program(czone_vm, program: str) -> None:
    print(run_program(czone_vm, program))
    assert_dmesg_clean(czone_vm)
    if program == "czone_oom":
        with czone_vm.ssh() as ssh:
            dmesg = ssh.check("dmesg").stdout
        # The CZone's OOM killer chose every victim, not a memcg's or the allocator.
        assert "constraint=CONSTRAINT_CZONE" in dmesg, dmesg[-4000:]
        assert "Memory cgroup out of memory" not in dmesg
        assert "global_oom" not in dmesg


def test_destroy(czone_vm, record_property) -> None:
    out = run_program(czone_vm, "czone_destroy")
    # "PASS: destroy with only a zombie: migrated=0 chunks=N in T ns"
    runs = re.findall(r"PASS: (destroy [^:]*): migrated=(\d+).* in (\d+) ns", out)
    assert len(runs) == 2, out
    for what, migrated, ns in runs:
        record_property(f"{what}: migrated pages", int(migrated))
        record_property(f"{what}: duration ns", int(ns))
    assert runs[0][1] == "0", "destroy after the container exited migrated pages"
    assert_dmesg_clean(czone_vm)


def test_stress_two_cpus(microvm_factory) -> None:
    vm = microvm_factory.boot("czone-smp", cpus=2, **CZONE_VM)
    run_program(vm, "czone_stress 10 4")
    assert_dmesg_clean(vm)


def test_fuzz_clone3_and_ioctls(czone_vm) -> None:
    print(f"czone_fuzz seed {FUZZ_SEED}, {FUZZ_ITERATIONS} iterations")
    run_program(czone_vm, f"czone_fuzz {FUZZ_ITERATIONS} {FUZZ_SEED}", timeout=1800)
    assert_dmesg_clean(czone_vm)
