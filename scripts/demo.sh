#!/usr/bin/env bash
# make demo: boot a CZone VM with czonectl, look at it from the host, then
# run the MCPV demo (python -m czone.demo): three containers in one VM, one
# destroyed and one idle, with the host's RSS before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
czonectl=.venv/bin/czonectl
name=demo-$$

trap '$czonectl vm down "$name" >/dev/null 2>&1 || true' EXIT
$czonectl doctor
$czonectl vm up --name "$name" --memory 768 --memory-mode czone --device-memory 1024
$czonectl vm list
echo "--- uname -r in the guest"
$czonectl vm ssh "$name" -- uname -r
echo "--- the virtio-czone driver in the guest"
$czonectl vm ssh "$name" -- "dmesg | grep virtio_czone; cat /sys/kernel/debug/czone/summary"
echo "--- the host's view"
$czonectl vm mem "$name"
$czonectl vm resize "$name" 512
$czonectl vm down "$name"
trap - EXIT
echo "--- MCPV: three containers in one VM"
.venv/bin/python -m czone.demo
echo "demo: done"
