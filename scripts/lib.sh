# Shared helpers for the build scripts.  Sourced, not run.
# shellcheck shell=bash
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${CZONE_CACHE:-$HOME/.cache/czone}
JOBS=${JOBS:-$(nproc)}
export CZONE_CACHE=$CACHE

log() { printf '%s: %s\n' "${TOOL:-czone}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Print the cache key of an artifact (kernel, qemu, image).
artifact_key() { python3 "$REPO/czone/artifacts.py" key "$1"; }

# If $1 (an artifact dir) is complete, say so and exit: the cache hit path.
reuse_if_built() {
	local dir=$1 marker=$2
	if [ -e "$dir/$marker" ]; then
		log "up to date, reusing $dir"
		exit 0
	fi
}

# Atomically publish a staged directory as the artifact dir.
publish() {
	local staged=$1 dir=$2
	rm -rf "$dir"
	mkdir -p "$(dirname "$dir")"
	mv "$staged" "$dir"
	ln -sfn "$(basename "$dir")" "$(dirname "$dir")/latest"
	log "built $dir"
}

# Turn an unpacked source dir into a git tree whose "upstream" tag is the
# pristine source, so our series applies with git am and exports with
# git format-patch.
git_tree_init() {
	local tree=$1 what=$2
	[ -d "$tree/.git" ] && return 0
	log "creating git work tree $tree"
	git -C "$tree" init -q
	git -C "$tree" config user.name "CZone build"
	git -C "$tree" config user.email "build@czone.invalid"
	git -C "$tree" config core.autocrlf false
	git -C "$tree" add -A -f .
	git -C "$tree" commit -q -m "$what"
	git -C "$tree" tag upstream
}

# The patch IDs of a series' files, one per line.
series_patch_ids() {
	local tree=$1; shift
	[ $# -gt 0 ] && cat "$@" | git -C "$tree" patch-id --stable | cut -d' ' -f1
}

# Reset the tree's "czone" branch to upstream and git-am the series in $2
# (numbered *.patch files, applied in name order).  Work that exists only
# in the tree is kept on a backup branch, never thrown away.
git_tree_apply() {
	local tree=$1 series=$2 patches
	if [ -n "$(git -C "$tree" status --porcelain --untracked-files=no)" ]; then
		git -C "$tree" stash push -q -m "czone-build $(date +%s)"
		log "stashed uncommitted edits in $tree (git stash list)"
	fi
	mapfile -t patches < <(find "$series" -maxdepth 1 -name '*.patch' | sort)
	# The branch already carries this code: keep its files (and their
	# mtimes), so that the build stays incremental.
	if [ "$(git -C "$tree" rev-parse -q --abbrev-ref HEAD)" = czone ] &&
	   [ "$(series_patch_ids "$tree" "${patches[@]}")" = \
	     "$(git -C "$tree" format-patch -q --stdout upstream..czone | git -C "$tree" patch-id --stable | cut -d' ' -f1)" ]; then
		log "$tree already carries ${series#"$REPO"/}"
		return 0
	fi
	if git -C "$tree" rev-parse -q --verify czone >/dev/null &&
	   [ "$(git -C "$tree" rev-parse czone)" != "$(git -C "$tree" rev-parse upstream)" ]; then
		git -C "$tree" branch -f "czone-backup" czone
	fi
	git -C "$tree" checkout -q -B czone upstream
	if [ ${#patches[@]} -gt 0 ]; then
		log "applying ${#patches[@]} patches from ${series#"$REPO"/}"
		git -C "$tree" am -q --committer-date-is-author-date "${patches[@]}" ||
			{ git -C "$tree" am --abort; die "series ${series#"$REPO"/} does not apply"; }
	fi
}

# Where the git work trees of the upstream sources live.
kernel_tree() {
	local v
	v=$(dpkg-query -W -f='${Version}' linux-source-6.12 2>/dev/null) ||
		die "linux-source-6.12 is not installed; run 'make deps'"
	echo "$CACHE/src/linux-$v"
}
qemu_tree() {
	local v
	v=$(dpkg-query -W -f='${Version}' qemu-system-data 2>/dev/null) ||
		die "qemu-system-data is not installed; run 'make deps'"
	echo "$CACHE/src/qemu-${v#*:}"
}

# Import the kernel series' virtio_czone.h into a QEMU tree the way QEMU's
# scripts/update-linux-headers.sh imports Linux headers (its cp_portable).
qemu_import_header() {
	local tree=$1 tmp
	tmp=$(mktemp -d)
	python3 "$REPO/czone/artifacts.py" shared-header > "$tmp/virtio_czone.h" ||
		die "cannot extract virtio_czone.h from the kernel series"
	eval "$(sed -n '/^cp_portable()/,/^}/p' "$tree/scripts/update-linux-headers.sh")"
	mkdir "$tmp/out"
	cp_portable "$tmp/virtio_czone.h" "$tmp/out"
	# an unchanged header keeps its mtime: ninja stays incremental
	cmp -s "$tmp/out/virtio_czone.h" "$tree/include/standard-headers/linux/virtio_czone.h" ||
		cp "$tmp/out/virtio_czone.h" "$tree/include/standard-headers/linux/"
	rm -rf "$tmp"
	grep -qx 'include/standard-headers/linux/virtio_czone.h' "$tree/.git/info/exclude" 2>/dev/null ||
		echo 'include/standard-headers/linux/virtio_czone.h' >> "$tree/.git/info/exclude"
}
