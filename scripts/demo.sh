#!/usr/bin/env bash
# make demo: boot a VM on our kernel and image, SSH in, show its memory
# zones, shut it down.
set -euo pipefail
cd "$(dirname "$0")/.."
czonectl=.venv/bin/czonectl
name=demo-$$

trap '$czonectl vm down "$name" >/dev/null 2>&1 || true' EXIT
$czonectl doctor
$czonectl vm up --name "$name" --memory 1024
$czonectl vm list
echo "--- uname -r in the guest"
$czonectl vm ssh "$name" -- uname -r
echo "--- memory zones in the guest (/proc/zoneinfo)"
$czonectl vm ssh "$name" -- "grep -E '^Node|present|managed' /proc/zoneinfo"
$czonectl vm down "$name"
trap - EXIT
echo "demo: done"
