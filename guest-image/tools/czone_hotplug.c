// SPDX-License-Identifier: GPL-2.0
/*
 * CZone chunks vs. memory offlining and compaction.  Which movable blocks
 * are online steers where a CZone's chunks come from:
 *  - a task R of CZone Z holds 12 MiB while HOME is the only movable
 *    block online with free memory (fillers outside any CZone take the
 *    free memory of blocks that cannot go offline);
 *    a filler outside any CZone then takes HOME's free memory, block
 *    SPARE goes online, and a task of Z that uses 24 MiB and exits leaves
 *    Z free chunks in SPARE;
 *  - offlining HOME moves R's pages into Z's chunks in SPARE: it
 *    succeeds, R's data is intact, and every page of R is in Z, none in
 *    HOME;
 *  - offlining SPARE then fails with EBUSY: Z has no room outside it;
 *    nothing moved;
 *  - compaction leaves Z's pages where they are;
 *  - destroy needs no migration, and the blocks go online again.
 *
 * Needs: /dev/czone, debugfs, memory hot(un)plug sysfs, ZONE_MOVABLE
 * (movablecore=) of at least two blocks.
 */
#include "czt.h"

#define MB (1UL << 20)
#define MAXR 1024
#define MAXB 64
#define HELD (12 * MB)

static struct czt_range r[MAXR];
static long bs;

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

/* The online blocks of ZONE_MOVABLE, up to MAXB; returns how many */
static int movable_blocks(long *out)
{
	char path[128], buf[64];
	int n = 0;

	for (long b = 0; b < 4096 && n < MAXB; b++) {
		int fd;
		ssize_t len;

		snprintf(path, sizeof(path),
			 "/sys/devices/system/memory/memory%ld/valid_zones", b);
		fd = open(path, O_RDONLY);
		if (fd < 0)
			continue;
		len = read(fd, buf, sizeof(buf) - 1);
		close(fd);
		if (len > 0 && !strncmp(buf, "Movable\n", 8))
			out[n++] = b;
	}
	return n;
}

/* R's side: holds HELD bytes until told to quit; checks them on request */
static void holder(int cmd, int reply, uint64_t id)
{
	char *p = mmap(NULL, HELD, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	long block, present, inside, outside;
	struct czt_range out;
	int n, bad;

	if (p == MAP_FAILED)
		_exit(2);
	madvise(p, HELD, MADV_NOHUGEPAGE);
	czt_touch(p, HELD, 1);
	write(reply, "r", 1);
	while (read(cmd, &block, sizeof(block)) == sizeof(block) && block >= 0) {
		bad = 0;
		for (size_t i = 0; i < HELD; i += 4096)
			bad += p[i] != (char)(1 + i / 4096);
		out.start = block * bs / 4096;
		out.end = (block + 1) * bs / 4096;
		n = czt_chunks(id, r, MAXR);
		czt_pfn_check(p, HELD, r, n, &out, 1, &present, &inside,
			      &outside);
		printf("INFO: R: %d pages changed, %ld of %ld pages in the CZone, %ld in memory%ld\n",
		       bad, inside, present, outside, block);
		fflush(stdout);
		write(reply, bad || present != HELD / 4096 || inside != present ||
		      outside ? "n" : "y", 1);
	}
	_exit(0);
}

/* Ask R to check its pages, none of them in @block; true if all is well */
static int r_ok(int cmd, int reply, long block)
{
	char c = 'n';

	write(cmd, &block, sizeof(block));
	read(reply, &c, 1);
	return c == 'y';
}

/* A task outside any CZone holding @bytes: the free memory it finds */
static pid_t filler(size_t bytes, int seed)
{
	int ready[2];
	pid_t pid;
	char c;

	if (pipe(ready))
		return -1;
	pid = fork();
	if (pid == 0) {
		czt_map_touched(bytes, seed);
		write(ready[1], "f", 1);
		pause();
		_exit(0);
	}
	if (pid > 0)
		read(ready[0], &c, 1);
	close(ready[0]);
	close(ready[1]);
	return pid;
}

static void stop(pid_t pid)
{
	if (pid > 0) {
		kill(pid, SIGKILL);
		czt_wait(pid);
	}
}

int main(void)
{
	long blocks[MAXB], offl[MAXB], home, spare, quit = -1;
	int cmd[2], reply[2], n, nb, no = 0, ret, i;
	pid_t pid, user, stuck = -1, full = -1;
	struct czone_destroy d = { 0 };
	struct czone_stat before, after;
	uint64_t id;
	char c;

	bs = block_size();
	nb = movable_blocks(blocks);
	/* offline the movable blocks that can go (not one with a firmware hole) */
	for (i = 0; i < nb; i++)
		if (set_state(blocks[i], "offline") == 0)
			offl[no++] = blocks[i];
	if (bs <= 0 || no < 2 || czt_create(64 * MB, &id) || pipe(cmd) ||
	    pipe(reply)) {
		czt_result(0, "setup: block size %ld, %d of %d movable blocks offline, %s",
			   bs, no, nb, strerror(errno));
		goto out_online;
	}
	home = offl[0];
	spare = offl[1];
	/* the free memory of the blocks that stayed goes to a task outside */
	if (no < nb)
		stuck = filler(160 * MB, 4);
	CZT_CHECK(set_state(home, "online_movable") == 0,
		  "online memory%ld (HOME)", home);

	pid = czt_clone_into(id);
	if (pid == 0)
		holder(cmd[0], reply[1], id);
	read(reply[0], &c, 1);

	/* HOME's free memory goes to a task outside too */
	full = filler(160 * MB, 2);
	CZT_CHECK(set_state(spare, "online_movable") == 0,
		  "online memory%ld (SPARE)", spare);
	user = czt_clone_into(id);
	if (user == 0) {
		czt_map_touched(24 * MB, 3);
		_exit(0);
	}
	czt_wait(user);
	stop(full);

	n = czt_chunks(id, r, MAXR);
	CZT_CHECK(n > 0 && !r_ok(cmd[1], reply[0], home),
		  "R's pages start in HOME (memory%ld), %d chunks", home, n);
	ret = set_state(home, "offline");
	CZT_CHECK(ret == 0, "offline memory%ld (HOME) holding R's chunks: %d",
		  home, ret);
	CZT_CHECK(r_ok(cmd[1], reply[0], home),
		  "R's pages moved within the CZone, out of HOME");

	czt_stat(id, &before);
	ret = set_state(spare, "offline");
	CZT_CHECK(ret == -EBUSY,
		  "offline memory%ld (SPARE), the CZone's only room: %d (want EBUSY)",
		  spare, ret);
	czt_stat(id, &after);
	CZT_CHECK(before.nr_chunks == after.nr_chunks &&
		  before.used_pages == after.used_pages,
		  "the failed offline left the CZone as it was (%llu chunks, %llu pages used)",
		  (unsigned long long)after.nr_chunks,
		  (unsigned long long)after.used_pages);

	ret = open("/proc/sys/vm/compact_memory", O_WRONLY);
	if (ret >= 0) {
		write(ret, "1", 1);
		close(ret);
	}
	CZT_CHECK(r_ok(cmd[1], reply[0], home),
		  "after the failed offline and compaction R's pages stay put");
	write(cmd[1], &quit, sizeof(quit));
	ret = czt_wait(pid);
	CZT_CHECK(ret == 0, "R exited (status %d)", ret);

	ret = czt_destroy(id, &d);
	CZT_CHECK(ret == 0 && d.migrated_pages == 0,
		  "destroy: %d migrated=%llu failed=%llu chunks=%llu", ret,
		  d.migrated_pages, d.failed_pages, d.released_chunks);
	/*
	 * khugepaged may hold a THP it took from the CZone for a child's
	 * mm for a moment after the child exits: the CZone then finishes by
	 * itself once it is freed.
	 */
	CZT_CHECK(!d.failed_pages || czt_gone_after(id, 10000) >= 0,
		  "the CZone is gone (at once, or once its last pages were freed)");
out_online:
	stop(stuck);
	for (i = 0; i < no; i++)
		set_state(offl[i], "online_movable");
	return czt_exit();
}
