"""Startup latency and host footprint: MCPV against the SCPV baselines.

Every case goes through the service layer exactly as ``czonectl run`` does,
in one private run root, on the same builds and with the same explicit TCG
translation-cache size.  Startup latency has one definition for every mode:
from the ``run`` request to the first answer of the warm-up invocation.
Templates and snapshots are built before anything is timed (a platform
builds them once per function), so SCPV is measured at its fastest.

- ``startup``: the k-th container of one function, k = 1..K, per mode.
- ``footprint``: the sum of the PSS of every QEMU process with N idle
  containers (each answered once), per mode; also without the TCG code
  cache (anonymous executable mappings in smaps), which a KVM host lacks.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from czone import artifacts, hostmem
from czone.bench.guestvm import TB_SIZE_MIB
from czone.bench.report import table
from czone.errors import CZoneError
from czone.functions import memory_for
from czone.placement import MCPV_MODES
from czone.service import RUN_MODES, Service
from czone.state import StateDB

FN = os.environ.get("CZONE_BENCH_FN", "float_operation")
MiB = hostmem.MiB


def _service(root: Path, kernel: artifacts.Kernel | None = None) -> Service:
    # The accelerator verdict is shared with the user's run root: no second probe.
    accel = StateDB().root / "accel.json"
    if accel.exists():
        root.mkdir(parents=True, exist_ok=True)
        (root / "accel.json").write_bytes(accel.read_bytes())
    return Service(db=StateDB(root), tb_size_mib=TB_SIZE_MIB,
                   templates=artifacts.cache_dir() / "bench" / "templates", kernel=kernel)


def _teardown(svc: Service) -> None:
    for vm in svc.db.list():
        try:
            svc.vm_down(vm.name, timeout=5)
        except CZoneError as e:
            print(f"  teardown of {vm.name}: {e}")


def _prepare(svc: Service, mode: str) -> None:
    if mode in MCPV_MODES:
        return
    spec = svc.vm_spec_for("probe", mode, memory_for(FN), 0)
    svc.template(spec, FN, memory_for(FN), warm=mode == "scpv-snapshot")


def code_cache_pss(pid: int) -> int:
    """PSS of anonymous executable mappings: TCG's translated code."""
    return hostmem.smaps_total(pid, "Pss", lambda perms, path: "x" in perms and not path)


def spread(xs: list[float]) -> str:
    if not xs:
        return "failed"
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return f"{statistics.median(xs):.3f} [{q[0]:.3f}, {q[2]:.3f}] n={len(xs)}"


def run_startup(k_max: int = int(os.environ.get("CZONE_BENCH_K", "16"))) -> dict[str, Any]:
    result: dict[str, Any] = {"fn": FN, "k": k_max, "tb_size_mib": TB_SIZE_MIB,
                              "kernel": artifacts.kernel().release,
                              "image": artifacts.image().version, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="czb-") as d:
        for mode in RUN_MODES:
            svc = _service(Path(d) / mode)
            result["accel"] = svc.accel()[0]
            samples: list[float | None] = []
            parts: list[dict[str, float]] = []
            try:
                _prepare(svc, mode)
                for k in range(1, k_max + 1):
                    try:
                        res = svc.run(FN, mode)  # type: ignore[arg-type]
                    except CZoneError as e:
                        print(f"  {mode} k={k}: failed: {e}")
                        samples.append(None)
                        continue
                    samples.append(res.startup_s)
                    parts.append(_parts(res))
                    print(f"  {mode} k={k}: {res.startup_s:.3f} s {parts[-1]}")
                if mode == "mcpv":
                    result["crun_profile"] = _crun_profile(svc)
            finally:
                _teardown(svc)
                svc.close()
            result["modes"][mode] = samples
            result.setdefault("parts", {})[mode] = parts
    return _startup_report(result)


def _parts(res: Any) -> dict[str, float]:
    """Where a startup's time went, in ms: the guest's own timings of the
    start and of the warm-up answer, and the rest (host, SSH, boot or clone)."""
    t = res.guest.get("t", {})
    out = {k: t[k] for k in ("czone_create_ms", "bundle_ms", "crun_to_ready_ms") if k in t}
    out["warmup_invoke_ms"] = res.warmup.get("t", {}).get("invoke_ms", 0.0)
    out["function_ms"] = res.warmup.get("run_ms", 0.0)
    out["rest_ms"] = res.startup_s * 1000 - t.get("agent_ms", 0.0) - out["warmup_invoke_ms"]
    return {k: round(v, 1) for k, v in out.items()}


PROFILE_REPS = 5
# What a container start pays for, step by step: crun alone (the container
# prints "ready" and exits), crun and the Python interpreter, and the real
# server (interpreter, the server and the function's imports).
PROFILE_CASES = {
    "crun": ["/bin/echo", "ready"],
    "crun+python": ["/usr/bin/python3", "-c", "print('ready')"],
    "crun+python+imports": None,
}


def _crun_profile(svc: Service) -> dict[str, list[float]]:
    vm = next(svc.running_vms()).name
    agent = svc.agent(vm)
    out: dict[str, list[float]] = {}
    for case, args in PROFILE_CASES.items():
        out[case] = []
        for i in range(PROFILE_REPS):
            ctr = f"profile-{i}"
            t = agent.start(ctr, FN, memory_for(FN), args=args)["t"]
            out[case].append(t["crun_to_ready_ms"])
            agent.kill(ctr)
    return out


def _startup_report(result: dict[str, Any]) -> dict[str, Any]:
    modes = result["modes"]
    warm = {m: [s for s in v[1:] if s is not None] for m, v in modes.items()}
    rows = [[m, "failed" if v[0] is None else f"{v[0]:.3f}", spread(warm[m])]
            for m, v in modes.items()]
    print(f"startup latency of the k-th container of {result['fn']} (s), "
          f"accel {result['accel']}, tb-size {result['tb_size_mib']} MiB")
    print(table(["mode", "k=1", "k>=2: median [p25, p75]"], rows))
    base = warm.get("scpv-template")
    ratios = []
    for m, xs in warm.items():
        if xs and base:
            ratios.append([m, f"{statistics.median(xs) / statistics.median(base):.3f}",
                           f"{min(xs) / max(base):.3f}..{max(xs) / min(base):.3f}"])
        else:
            ratios.append([m, "failed", "-"])
    print("\nratio of medians against scpv-template (k>=2), and the range "
          "(best/worst .. worst/best)")
    print(table(["mode", "ratio", "range"], ratios))
    result["ratios_vs_scpv_template"] = {r[0]: r[1] for r in ratios}
    prof = result.get("crun_profile")
    if prof:
        print(f"\nwhere an MCPV start goes: median ms of {PROFILE_REPS} starts, crun to 'ready'")
        print(table(["case", "median ms", "min", "max"],
                    [[c, f"{statistics.median(v):.0f}", f"{min(v):.0f}", f"{max(v):.0f}"]
                     for c, v in prof.items()]))
    for mode, parts in result.get("parts", {}).items():
        later = parts[1:]
        if later:
            keys = list(later[0])
            print(f"\n{mode}, k>=2: median ms per part")
            print(table(keys, [[f"{statistics.median([p.get(k, 0) for p in later]):.0f}"
                                for k in keys]]))
    return result


def run_footprint(ns: tuple[int, ...] = (1, 4, 16)) -> dict[str, Any]:
    ns = tuple(int(n) for n in os.environ.get("CZONE_BENCH_N", ",".join(map(str, ns)))
               .split(","))
    result: dict[str, Any] = {"fn": FN, "tb_size_mib": TB_SIZE_MIB, "ns": ns, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="czb-") as d:
        for mode in RUN_MODES:
            per_n = {}
            for n in ns:
                svc = _service(Path(d) / f"{mode}-{n}")
                result["accel"] = svc.accel()[0]
                try:
                    _prepare(svc, mode)
                    for _ in range(n):
                        svc.run(FN, mode)  # type: ignore[arg-type]
                    pids = [v.pid for v in svc.running_vms(mode=None)]
                    time.sleep(2)  # idle: the warm-up answers are done
                    pss = sum(hostmem.stable_pss(p) for p in pids)
                    code = sum(code_cache_pss(p) for p in pids)
                    per_n[n] = {"vms": len(pids), "pss": pss, "code_cache_pss": code}
                except CZoneError as e:
                    print(f"  {mode} N={n}: failed: {e}")
                    per_n[n] = None
                finally:
                    _teardown(svc)
                    svc.close()
                print(f"  {mode} N={n}: {per_n[n]}")
            result["modes"][mode] = per_n
    return _footprint_report(result)


def _footprint_report(result: dict[str, Any]) -> dict[str, Any]:
    modes, ns = result["modes"], result["ns"]
    def no_code(r: dict[str, int]) -> int:
        return r["pss"] - r["code_cache_pss"]

    rows = []
    for m, per_n in modes.items():
        for n in ns:
            r = per_n.get(n)
            rows.append([m, n] + (["failed"] * 3 if r is None else
                                  [r["vms"], f"{r['pss'] / MiB:.0f}", f"{no_code(r) / MiB:.0f}"]))
    print(f"host footprint: sum of QEMU PSS (MiB) with N idle {result['fn']} containers, "
          f"accel {result['accel']}, tb-size {result['tb_size_mib']} MiB")
    print(table(["mode", "N", "VMs", "PSS", "PSS without code cache"], rows))
    base = modes.get("scpv-template", {})
    ratios = []
    for m, per_n in modes.items():
        for n in ns:
            r, b = per_n.get(n), base.get(n)
            if r and b:
                ratios.append([m, n, f"{r['pss'] / b['pss']:.3f}",
                               f"{no_code(r) / no_code(b):.3f}"])
            else:
                ratios.append([m, n, "failed", "failed"])
    print("\nratio against scpv-template (one measurement per cell)")
    print(table(["mode", "N", "PSS", "without code cache"], ratios))
    return result
