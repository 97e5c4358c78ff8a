#!/usr/bin/env bash
# make kernel-stock: Debian's linux-source-6.12 with the same config
# fragments as `make kernel`, without the CZone series and its options:
# the baseline of the run-time overhead benchmark (docs/evaluation.md).
TOOL=kernel-stock
. "$(dirname "$0")/lib.sh"

key=$(artifact_key kernel-stock)
out=$CACHE/kernel-stock/$key
reuse_if_built "$out" release

tree=$(kernel_tree)
[ -d "$tree/.git" ] || die "no kernel tree at $tree; run 'make kernel' first"
stock=$CACHE/src/linux-stock
obj=$CACHE/build/kernel-stock-obj
if [ ! -e "$stock/.git" ]; then
	git -C "$tree" worktree prune
	git -C "$tree" worktree add -q --detach "$stock" upstream
fi
git -C "$stock" checkout -q --detach upstream

mkdir -p "$obj"
kmake() { make -C "$stock" O="$obj" LOCALVERSION="-stock-${key:0:8}" "$@"; }
kmake -s x86_64_defconfig
# Every option of ours except those the series adds.
grep -vhE '^(# )?CONFIG_(VIRTIO_)?CZONE(_[A-Z0-9_]+)?[= ]' "$REPO"/kernel-patches/configs/*.config \
	> "$obj/czone-stock.config"
"$stock/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" \
	"$stock/kernel/configs/kvm_guest.config" "$obj/czone-stock.config" >/dev/null
kmake -s olddefconfig
bad=0
while read -r line; do
	case "$line" in
	CONFIG_*=*) grep -qxF "$line" "$obj/.config" || { log "requested $line"; bad=1; } ;;
	esac
done < "$obj/czone-stock.config"
[ $bad -eq 0 ] || die "config fragments were not honoured (see above)"

log "building kernel $key with -j$JOBS"
start=$(date +%s)
kmake -j"$JOBS" vmlinux
log "built in $(( $(date +%s) - start )) s"

stage=$CACHE/kernel-stock/.stage-$key
rm -rf "$stage" && mkdir -p "$stage"
cp "$obj/vmlinux" "$obj/System.map" "$stage/"
cp "$obj/.config" "$stage/config"
kmake -s kernelrelease > "$stage/release"
publish "$stage" "$out"
