// SPDX-License-Identifier: GPL-2.0
/*
 * CZone chunks vs. memory offlining and compaction: offlining a memory
 * block that holds a chunk fails with EBUSY, compaction leaves the pages
 * of a CZone where they are, and after destroy the block can go offline
 * (informational: other pages in the block may pin it).
 *
 * Needs: /dev/czone, debugfs, memory hot(un)plug sysfs, ZONE_MOVABLE
 * (movablecore=).
 */
#include "czt.h"

#define MB (1UL << 20)
#define MAXR 1024

static struct czt_range r[MAXR];

static long block_size(void)
{
	char buf[64] = "";
	int fd = open("/sys/devices/system/memory/block_size_bytes", O_RDONLY);

	if (fd < 0)
		return -1;
	read(fd, buf, sizeof(buf) - 1);
	close(fd);
	return strtol(buf, NULL, 16);
}

static int set_state(long block, const char *state)
{
	char path[128];

	snprintf(path, sizeof(path), "/sys/devices/system/memory/memory%ld/state",
		 block);
	return czt_write(path, state);
}

int main(void)
{
	long present, inside, outside, bs = block_size(), block;
	int go[2], ready[2], n, ret;
	struct czone_destroy d = { 0 };
	uint64_t id;
	pid_t pid;
	char c;

	if (bs <= 0 || czt_create(32 * MB, &id) || pipe(go) || pipe(ready)) {
		czt_result(0, "setup: block size %ld, %s", bs, strerror(errno));
		return czt_exit();
	}
	pid = czt_clone_into(id);
	if (pid == 0) {
		char *p = mmap(NULL, 8 * MB, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		czt_touch(p, 8 * MB, 1);
		write(ready[1], "r", 1);
		read(go[0], &c, 1);
		n = czt_chunks(id, r, MAXR);
		czt_pfn_check(p, 8 * MB, r, n, NULL, 0, &present, &inside,
			      &outside);
		CZT_CHECK(present == 2048 && inside == present,
			  "after offline attempt and compaction: %ld of %ld pages in the CZone",
			  inside, present);
		_exit(czt_failures ? 1 : 0);
	}
	read(ready[0], &c, 1);

	n = czt_chunks(id, r, MAXR);
	if (n <= 0) {
		czt_result(0, "no chunks");
		return czt_exit();
	}
	block = (long)(r[0].start * 4096 / bs);
	ret = set_state(block, "offline");
	CZT_CHECK(ret == -EBUSY, "offline memory%ld holding chunk %#llx: %d (want EBUSY)",
		  block, (unsigned long long)r[0].start, ret);
	if (ret == 0)
		set_state(block, "online_movable");

	ret = open("/proc/sys/vm/compact_memory", O_WRONLY);
	if (ret >= 0) {
		write(ret, "1", 1);
		close(ret);
	}
	write(go[1], "g", 1);
	ret = czt_wait(pid);
	CZT_CHECK(ret == 0, "child's pages stayed put (status %d)", ret);

	ret = czt_destroy(id, &d);
	CZT_CHECK(ret == 0 && d.migrated_pages == 0,
		  "destroy: %d migrated=%llu failed=%llu chunks=%llu", ret,
		  d.migrated_pages, d.failed_pages, d.released_chunks);
	/*
	 * khugepaged may hold a THP it took from the CZone for the child's
	 * mm for a moment after the child exits: the CZone then finishes by
	 * itself once it is freed.
	 */
	CZT_CHECK(!d.failed_pages || czt_gone_after(id, 10000) >= 0,
		  "the CZone is gone (at once, or once its last pages were freed)");
	ret = set_state(block, "offline");
	printf("INFO: offline memory%ld after destroy: %d\n", block, ret);
	if (ret == 0)
		printf("INFO: online_movable again: %d\n",
		       set_state(block, "online_movable"));
	return czt_exit();
}
