#!/usr/bin/env bash
# Kernel/QEMU development in the cached git work trees.
#   dev-tree.sh kernel|qemu          apply the repo's series, print the tree
#   dev-tree.sh kernel|qemu export   git format-patch upstream..HEAD into the repo
# The repo's patches stay the source of truth: build-*.sh re-applies them.
TOOL=dev-tree
. "$(dirname "$0")/lib.sh"

what=${1:-}; action=${2:-apply}
case $what in
kernel) tree=$(kernel_tree); series=$REPO/kernel-patches/6.12.x ;;
qemu) tree=$(qemu_tree); series=$REPO/qemu-device ;;
*) die "usage: $0 kernel|qemu [export]" ;;
esac
[ -d "$tree/.git" ] || die "no work tree at $tree; run 'make $what' first"

case $action in
apply)
	git_tree_apply "$tree" "$series"
	[ "$what" = qemu ] && qemu_import_header "$tree"
	echo "$tree"
	;;
export)
	[ -z "$(git -C "$tree" status --porcelain --untracked-files=no)" ] ||
		die "$tree has uncommitted changes; commit them first"
	find "$series" -maxdepth 1 -name '*.patch' -delete
	git -C "$tree" format-patch -q --no-signature -o "$series" upstream..HEAD
	log "exported $(git -C "$tree" rev-list --count upstream..HEAD) patches to ${series#"$REPO"/}"
	;;
*) die "unknown action $action" ;;
esac
