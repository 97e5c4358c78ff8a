#!/usr/bin/env bash
# make demo: MCPV as a user sees it.  Three matmul containers are placed in
# one VM (the first boots it, the others join it, each in a CZone of its
# own), invoked, and one is killed: the host's RSS shows its memory coming
# back.  Then the lower-level demo: synthetic containers and idle reclaim.
set -euo pipefail
cd "$(dirname "$0")/.."
czonectl=.venv/bin/czonectl
vm=

trap '[ -n "$vm" ] && $czonectl vm down "$vm" >/dev/null 2>&1 || true' EXIT
$czonectl doctor
echo "--- the functions"
$czonectl fn list
echo "--- three matmul containers: the first boots the function's VM, the others join it"
ids=()
for _ in 1 2 3; do
	line=$($czonectl run matmul)
	echo "$line"
	ids+=("${line%% *}")
	vm=$(echo "$line" | sed -n 's/.*(VM \([^,)]*\).*/\1/p')
done
$czonectl ps
echo "--- invoke: the default payload, then a larger one, then one the function rejects"
$czonectl invoke "${ids[0]}"
$czonectl invoke "${ids[0]}" '{"n": 600}'
$czonectl invoke "${ids[0]}" '{"n": 0}' || true
echo "--- the host's view, per VM, and the guest's per CZone"
$czonectl stats
echo "--- kill one container: its CZone is destroyed, its memory goes back to the host"
$czonectl kill "${ids[1]}"
$czonectl reclaim
$czonectl stats
$czonectl ps
$czonectl vm down "$vm"
vm=
trap - EXIT
echo "--- under the hood: synthetic containers, destroy and idle reclaim"
.venv/bin/python -m czone.demo
echo "demo: done"
