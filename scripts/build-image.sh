#!/usr/bin/env bash
# make image: a read-only squashfs guest root from Debian packages, with a
# fresh SSH host key and client key pair per build (kept in the cache only).
TOOL=image
. "$(dirname "$0")/lib.sh"

key=$(artifact_key image)
out=$CACHE/image/$key
reuse_if_built "$out" version

[ "$(id -u)" -eq 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap missing; run 'make deps'"
mirror=${CZONE_MIRROR:-http://deb.debian.org/debian}
pkgs=$(grep -v '^#' "$REPO/guest-image/packages" | xargs | tr ' ' ,)
start=$(date +%s)

# The debootstrap result is its own cache layer, keyed by the package list,
# so changing the overlay or the in-guest tools does not re-run debootstrap.
base=$CACHE/image-base/$(echo "bookworm $mirror $pkgs" | sha256sum | cut -c1-12).tar
if [ ! -f "$base" ]; then
	tmp=$CACHE/image-base/.debootstrap-$$
	rm -rf "$tmp" && mkdir -p "$tmp"
	log "debootstrap minbase + $pkgs"
	debootstrap --variant=minbase --include="$pkgs" bookworm "$tmp/root" "$mirror" \
		>"$tmp/debootstrap.log" 2>&1 ||
		{ tail -20 "$tmp/debootstrap.log" >&2; rm -rf "$tmp"; die "debootstrap failed"; }
	rm -rf "$tmp"/root/var/cache/apt/* "$tmp"/root/var/lib/apt/lists/* \
		"$tmp"/root/usr/share/doc "$tmp"/root/usr/share/man "$tmp"/root/usr/share/locale
	tar -C "$tmp/root" -cf "$tmp/root.tar" .
	mv "$tmp/root.tar" "$base"
	rm -rf "$tmp"
else
	log "reusing debootstrap base $base"
fi

stage=$CACHE/image/.stage-$key
root=$stage/root
rm -rf "$stage" && mkdir -p "$root"
trap 'rm -rf "$stage"' EXIT

# The function base image: the same Debian root plus the functions and
# their server, byte-compiled by the guest's own Python.  No keys, agent or
# tools of the VM: a container sees only this.
fnroot=$stage/fnbase
mkdir -p "$fnroot"
tar -C "$fnroot" -xf "$base"
cp -a "$REPO/guest-image/functions" "$fnroot/opt/fn"
chroot "$fnroot" /usr/bin/python3 -m compileall -q /opt/fn >/dev/null ||
	die "byte-compiling the functions failed"
mksquashfs "$fnroot" "$stage/fnbase.squashfs" -noappend -no-xattrs -all-root \
	-noI -noD -noF -noX -quiet >/dev/null
rm -rf "$fnroot"

tar -C "$root" -xf "$base"

cp -a "$REPO/guest-image/rootfs/." "$root/"

kdir=$(python3 "$REPO/czone/artifacts.py" dir kernel)
[ -d "$kdir/include" ] || die "kernel headers missing at $kdir/include; run 'make kernel'"
mkdir -p "$stage/tools"
make -s -C "$REPO/guest-image/tools" O="$stage/tools" KHDR="$kdir/include" ||
	die "building the in-guest tools failed"
find "$stage/tools" -maxdepth 1 -type f -executable -exec install -m 755 -t "$root/usr/local/bin" {} +
cp -a "$kdir/selftests" "$root/opt/selftests"
echo "czone-image-$key" > "$root/etc/czone-release"
echo czone > "$root/etc/hostname"

mkdir -p "$root/etc/dropbear"
dropbearkey -t ed25519 -f "$root/etc/dropbear/dropbear_ed25519_host_key" >/dev/null 2>&1
ssh-keygen -q -t ed25519 -N '' -C "czone-$key" -f "$stage/id_ed25519"
install -d -m 700 "$root/root/.ssh"
install -m 600 "$stage/id_ed25519.pub" "$root/root/.ssh/authorized_keys"

mksquashfs "$root" "$stage/rootfs.squashfs" -noappend -no-xattrs -all-root \
	-noI -noD -noF -noX -quiet >/dev/null
rm -rf "$root"
echo "czone-image-$key" > "$stage/version"
log "built in $(( $(date +%s) - start )) s ($(du -h "$stage/rootfs.squashfs" | cut -f1))"
trap - EXIT
publish "$stage" "$out"
