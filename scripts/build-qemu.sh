#!/usr/bin/env bash
# make qemu: Debian's QEMU 7.2 source + qemu-device/ series, x86_64-softmmu.
TOOL=qemu
. "$(dirname "$0")/lib.sh"

key=$(artifact_key qemu)
out=$CACHE/qemu/$key
reuse_if_built "$out" bin/qemu-system-x86_64

# Build the source that matches Debian's firmware package (our -L path).
ver=$(dpkg-query -W -f='${Version}' qemu-system-data 2>/dev/null) ||
	die "qemu-system-data is not installed; run 'make deps'"
tree=$(qemu_tree)
obj=$CACHE/build/qemu-obj

if [ ! -d "$tree/.git" ]; then
	dl=$CACHE/src/qemu-dl
	mkdir -p "$dl"
	log "fetching source qemu=$ver"
	(cd "$dl" && apt-get source -qq --download-only "qemu=$ver") ||
		die "apt-get source qemu=$ver failed (is there a deb-src entry? run 'make deps')"
	rm -rf "$tree.tmp"
	# apt already checked the hashes against the signed Release file.
	dpkg-source -x "$dl"/qemu_"${ver#*:}".dsc "$tree.tmp" >/dev/null 2>&1 ||
		die "dpkg-source -x failed"
	git_tree_init "$tree.tmp" "qemu $ver (Debian source, Debian patches applied)"
	mv "$tree.tmp" "$tree"
fi
git_tree_apply "$tree" "$REPO/qemu-device"
qemu_import_header "$tree"

# Debian's tarball drops the edk2 firmware blobs; never try to unpack them.
opts=(
	--target-list=x86_64-softmmu --without-default-features
	--enable-kvm --enable-tcg --enable-slirp --enable-fdt=system
	--enable-vhost-kernel --enable-vhost-net
	--disable-install-blobs --disable-docs --disable-werror
	--prefix=/usr --firmwarepath=/usr/share/qemu:/usr/share/seabios
)
stamp="${opts[*]}"
if [ ! -f "$obj/build.ninja" ] || [ "$(cat "$obj/.czone-configure" 2>/dev/null)" != "$stamp" ]; then
	rm -rf "$obj" && mkdir -p "$obj"
	log "configuring"
	(cd "$obj" && "$tree/configure" "${opts[@]}" >configure.log 2>&1) ||
		{ tail -30 "$obj/configure.log" >&2; die "configure failed, log: $obj/configure.log"; }
	echo "$stamp" > "$obj/.czone-configure"
fi

log "building with -j$JOBS"
start=$(date +%s)
ninja -C "$obj" -j"$JOBS" qemu-system-x86_64 >"$obj/build.log" 2>&1 ||
	{ tail -40 "$obj/build.log" >&2; die "build failed, log: $obj/build.log"; }
log "built in $(( $(date +%s) - start )) s"

stage=$CACHE/qemu/.stage-$key
rm -rf "$stage" && mkdir -p "$stage/bin"
cp "$obj/qemu-system-x86_64" "$stage/bin/"
"$stage/bin/qemu-system-x86_64" --version | head -1 > "$stage/version"
publish "$stage" "$out"
