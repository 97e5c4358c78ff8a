"""Properties of the placement policy (hypothesis), and its three steps."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from czone.placement import Decision, NoFit, VmView, place

MAX, BLOCK = 1024, 2


def vm(name: str, fn: str = "f", requested: int = 256, placed: int = 0, **kw) -> VmView:
    return VmView(name, fn, kw.pop("mode", "mcpv"), requested, MAX, placed, **kw)


def test_room_first_then_grow_then_boot() -> None:
    assert place("f", 128, "mcpv", [vm("a", placed=128)], MAX, BLOCK) == \
        Decision("place", "a", 256)
    assert place("f", 128, "mcpv", [vm("a", placed=200)], MAX, BLOCK) == \
        Decision("grow", "a", 328)
    assert place("f", 128, "mcpv", [vm("a", requested=1024, placed=1000)], MAX, BLOCK) == \
        Decision("boot", None, 128)


def test_other_functions_dead_vms_and_scpv_are_never_shared() -> None:
    others = [vm("g", fn="g"), vm("d", usable=False), vm("s", mode="scpv-template")]
    assert place("f", 64, "mcpv", others, MAX, BLOCK).action == "boot"
    assert place("f", 64, "scpv-template", [vm("a")], MAX, BLOCK).action == "boot"


def test_mcpv_baselines_place_alike_but_only_in_vms_of_their_mode() -> None:
    for mode in ("mcpv-virtio-mem", "mcpv-balloon"):
        assert place("f", 128, mode, [vm("a", placed=128, mode=mode)], MAX, BLOCK) == \
            Decision("place", "a", 256)
        assert place("f", 128, mode, [vm("a", placed=200, mode=mode)], MAX, BLOCK) == \
            Decision("grow", "a", 328)
        # a CZone VM of the function is no place for a baseline's container, nor back
        assert place("f", 64, mode, [vm("c")], MAX, BLOCK).action == "boot"
        assert place("f", 64, "mcpv", [vm("b", mode=mode)], MAX, BLOCK).action == "boot"


def test_a_container_goes_only_into_a_vm_of_its_network_mode() -> None:
    user, bridged = vm("u", placed=0), vm("b", placed=0, net="bridge")
    assert place("f", 64, "mcpv", [user, bridged], MAX, BLOCK, "bridge") == \
        Decision("place", "b", 256)
    assert place("f", 64, "mcpv", [bridged], MAX, BLOCK) == Decision("boot", None, 64)
    assert place("f", 64, "mcpv", [user], MAX, BLOCK, "bridge") == Decision("boot", None, 64)


def test_too_large_or_empty_requests_are_refused() -> None:
    with pytest.raises(NoFit, match="more than a VM can hold"):
        place("f", MAX + 1, "mcpv", [], MAX, BLOCK)
    with pytest.raises(NoFit):
        place("f", 0, "mcpv", [], MAX, BLOCK)


# A run of operations: ("run", fn, mib, mode) or ("kill", index of a live container).
ops = st.lists(st.one_of(
    st.tuples(st.just("run"), st.sampled_from("fgh"), st.integers(1, MAX + 64),
              st.sampled_from(["mcpv", "mcpv", "scpv-template"])),
    st.tuples(st.just("kill"), st.integers(0, 1000))), max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_invariants_over_any_run_of_operations(seq: list[tuple]) -> None:
    vms: dict[str, dict] = {}
    ctrs: dict[int, tuple[str, int, str]] = {}  # id -> (vm, mib, fn)
    started = 0
    for op in seq:
        if op[0] == "kill":
            if ctrs:
                del ctrs[sorted(ctrs)[op[1] % len(ctrs)]]
            continue
        _, fn, mib, mode = op
        views = [VmView(n, v["fn"], v["mode"], v["req"], MAX,
                        sum(m for vm_name, m, _ in ctrs.values() if vm_name == n))
                 for n, v in vms.items()]
        try:
            d = place(fn, mib, mode, views, MAX, BLOCK)
        except NoFit:
            assert mib > MAX, "only a request larger than any VM is refused"
            continue
        if d.action == "boot" and mode == "mcpv":
            assert not any(v.fn == fn and v.mode == "mcpv" and v.placed_mib + mib <= MAX
                           for v in views), "MCPV boots only when no VM of the function fits"
        if d.action == "grow":
            assert not any(v.fn == fn and v.mode == "mcpv" and v.placed_mib + mib <= v.requested_mib
                           for v in views), "MCPV grows only when no VM of the function has room"
        if d.action == "boot":
            name = f"vm{len(vms)}"
            vms[name] = {"fn": fn, "mode": mode, "req": d.requested_mib}
        else:
            name = d.vm
            assert d.requested_mib >= vms[name]["req"], "placement never shrinks a VM"
            vms[name]["req"] = d.requested_mib
        ctrs[started] = (name, mib, fn)
        started += 1
        for n, v in vms.items():
            inside = [(m, f) for vm_name, m, f in ctrs.values() if vm_name == n]
            assert all(f == v["fn"] for _, f in inside), "a VM holds one function only"
            assert sum(m for m, _ in inside) <= v["req"] <= MAX, \
                "what is placed fits the requested size, which fits the maximum"
            if v["mode"] != "mcpv":
                assert len(inside) <= 1, "an SCPV VM holds one container"
        # No container lost or counted twice: what the next decision sees placed
        # is exactly the caps of the live containers.
        views_after = sum(sum(m for vm_name, m, _ in ctrs.values() if vm_name == n) for n in vms)
        assert views_after == sum(m for _, m, _ in ctrs.values())
