#!/usr/bin/env bash
# make kernel: Debian's linux-source-6.12 + kernel-patches/6.12.x + configs.
# make kernel-debug (CZONE_KERNEL_FLAVOUR=debug): the same, plus
# kernel-patches/debug/debug.config, in its own object dir and artifact.
TOOL=kernel
. "$(dirname "$0")/lib.sh"

case ${CZONE_KERNEL_FLAVOUR:-} in
"") name=kernel tag=czone extra=() ;;
debug) name=kernel-debug tag=czone-debug extra=("$REPO/kernel-patches/debug/debug.config") ;;
*) die "unknown CZONE_KERNEL_FLAVOUR=$CZONE_KERNEL_FLAVOUR (want debug, or nothing)" ;;
esac
key=$(artifact_key $name)
out=$CACHE/$name/$key
reuse_if_built "$out" release

tarball=$(ls /usr/src/linux-source-6.12.tar.xz 2>/dev/null) ||
	die "linux-source-6.12 is not installed; run 'make deps'"
tree=$(kernel_tree)
srcver=${tree##*/linux-}
obj=$CACHE/build/$name-obj

if [ ! -d "$tree/.git" ]; then
	log "unpacking $tarball"
	rm -rf "$tree.tmp" && mkdir -p "$tree.tmp"
	tar -C "$tree.tmp" --strip-components=1 -xf "$tarball"
	git_tree_init "$tree.tmp" "linux-source-6.12 $srcver"
	mv "$tree.tmp" "$tree"
fi
git_tree_apply "$tree" "$REPO/kernel-patches/6.12.x"

mkdir -p "$obj"
kmake() { make -C "$tree" O="$obj" LOCALVERSION="-$tag-${key:0:8}" "$@"; }
kmake -s x86_64_defconfig
fragments=("$REPO"/kernel-patches/configs/*.config "${extra[@]}")
"$tree/scripts/kconfig/merge_config.sh" -m -O "$obj" "$obj/.config" \
	"$tree/kernel/configs/kvm_guest.config" "${fragments[@]}" >/dev/null
kmake -s olddefconfig

# Strict merge: every requested option must survive olddefconfig.
bad=0
while read -r line; do
	case "$line" in
	CONFIG_*=*)
		grep -qxF "$line" "$obj/.config" || { log "requested $line, got: $(grep -E "^(# )?${line%%=*}[= ]" "$obj/.config" || echo unset)"; bad=1; } ;;
	"# CONFIG_"*" is not set")
		opt=${line#\# }; opt=${opt%% *}
		! grep -qE "^$opt=" "$obj/.config" || { log "requested $line, got: $(grep -E "^$opt=" "$obj/.config")"; bad=1; } ;;
	esac
done < <(cat "${fragments[@]}")
[ $bad -eq 0 ] || die "config fragments were not honoured (see above)"

log "building kernel $key with -j$JOBS"
start=$(date +%s)
kmake -j"$JOBS" vmlinux
kmake -s headers_install INSTALL_HDR_PATH="$obj/usr-headers" >/dev/null
log "built in $(( $(date +%s) - start )) s"

# Upstream selftests that must stay green, built static from the same tree
# against its own UAPI headers, run in the guest by tests/vm.
selftests=(clone3 memory-hotplug)
rm -rf "$obj/selftests"
make -s -C "$tree/tools/testing/selftests" TARGETS="${selftests[*]}" \
	KHDR_INCLUDES="-isystem $obj/usr-headers/include" LDFLAGS=-static \
	O="$obj/selftests-build" INSTALL_PATH="$obj/selftests" install >/dev/null ||
	die "building selftests ${selftests[*]} failed"

stage=$CACHE/$name/.stage-$key
rm -rf "$stage" && mkdir -p "$stage"
cp "$obj/vmlinux" "$obj/.config" "$obj/System.map" "$stage/"
mv "$stage/.config" "$stage/config"
cp -r "$obj/usr-headers/include" "$stage/include"
cp -r "$obj/selftests" "$stage/selftests"
kmake -s kernelrelease > "$stage/release"
publish "$stage" "$out"
