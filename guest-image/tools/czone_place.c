// SPDX-License-Identifier: GPL-2.0
/*
 * Placement: a task cloned into CZone A gets its anonymous, THP, tmpfs and
 * memfd pages from A's chunks only, never from B's; so does its forked
 * child.  Then both CZones are destroyed with nothing to migrate.
 *
 * Needs: /dev/czone, debugfs at /sys/kernel/debug, a tmpfs at $CZT_TMP
 * (default /tmp).
 */
#include "czt.h"

#define MB (1UL << 20)
#define MAXR 1024

static struct czt_range ra[MAXR], rb[MAXR];
static int na, nb;

static void reload(uint64_t a, uint64_t b)
{
	na = czt_chunks(a, ra, MAXR);
	nb = czt_chunks(b, rb, MAXR);
}

static void check_region(const char *what, void *p, size_t len)
{
	long present, inside, outside;

	if (czt_pfn_check(p, len, ra, na, rb, nb, &present, &inside,
			  &outside)) {
		czt_result(0, "%s: cannot read pagemap", what);
		return;
	}
	CZT_CHECK(present > 0 && inside == present && outside == 0,
		  "%s: %ld pages resident, %ld in A's chunks, %ld in B's",
		  what, present, inside, outside);
}

/*
 * Small guests (< 512 MiB) boot with THP "never": allow madvise.  A CZone
 * grows for a THP only if the THP fault may block (defrag).
 */
static void thp_madvise(const char *file)
{
	char buf[128] = "";
	int fd = open(file, O_RDWR);

	if (fd < 0)
		return;
	read(fd, buf, sizeof(buf) - 1);
	if (strstr(buf, "[never]"))
		write(fd, "madvise", 7);
	close(fd);
}

static int child_a(uint64_t a, uint64_t b, const char *tmpdir)
{
	char path[256];
	char *anon, *thp, *file, *mfd;
	size_t thp_len = 4 * MB;
	int fd, mfdfd;
	pid_t pid;

	CZT_CHECK(czt_proc_czone(getpid()) == (long long)a,
		  "child: /proc/self/czone is %lld (want %llu)",
		  czt_proc_czone(getpid()), (unsigned long long)a);

	anon = mmap(NULL, 8 * MB, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	czt_touch(anon, 8 * MB, 1);

	/* 2 MiB-aligned region for THPs */
	thp = mmap(NULL, thp_len + 2 * MB, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	thp = (char *)(((uintptr_t)thp + 2 * MB - 1) & ~(2 * MB - 1));
	madvise(thp, thp_len, MADV_HUGEPAGE);
	czt_touch(thp, thp_len, 2);

	snprintf(path, sizeof(path), "%s/czt-place", tmpdir);
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	if (fd < 0 || ftruncate(fd, 4 * MB)) {
		czt_result(0, "tmpfs file %s: %s", path, strerror(errno));
		return 1;
	}
	file = mmap(NULL, 4 * MB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	czt_touch(file, 4 * MB, 3);

	mfdfd = memfd_create("czt", 0);
	if (mfdfd < 0 || ftruncate(mfdfd, 2 * MB)) {
		czt_result(0, "memfd: %s", strerror(errno));
		return 1;
	}
	mfd = mmap(NULL, 2 * MB, PROT_READ | PROT_WRITE, MAP_SHARED, mfdfd, 0);
	czt_touch(mfd, 2 * MB, 4);

	if (anon == MAP_FAILED || file == MAP_FAILED || mfd == MAP_FAILED) {
		czt_result(0, "mmap failed");
		return 1;
	}

	reload(a, b);
	CZT_CHECK(na > 0 && nb > 0, "debugfs: A has %d chunks, B has %d", na,
		  nb);
	check_region("anon", anon, 8 * MB);
	check_region("THP", thp, thp_len);
	check_region("tmpfs", file, 4 * MB);
	check_region("memfd", mfd, 2 * MB);
	CZT_CHECK(czt_file_value("/proc/self/smaps_rollup", "AnonHugePages:") >= 2048, "THP: AnonHugePages %ld kB",
		  czt_file_value("/proc/self/smaps_rollup", "AnonHugePages:"));

	pid = fork();
	if (pid == 0) {
		char *more = mmap(NULL, 2 * MB, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		czt_failures = 0;
		CZT_CHECK(czt_proc_czone(getpid()) == (long long)a,
			  "forked child: /proc/self/czone is %lld",
			  czt_proc_czone(getpid()));
		czt_touch(more, 2 * MB, 5);
		/* copy-on-write of the parent's pages */
		czt_touch(anon, 8 * MB, 6);
		reload(a, b);
		check_region("forked child anon", more, 2 * MB);
		check_region("forked child COW", anon, 8 * MB);
		_exit(czt_failures ? 1 : 0);
	}
	CZT_CHECK(pid > 0 && czt_wait(pid) == 0, "forked child passed");

	munmap(file, 4 * MB);
	close(fd);
	return czt_failures ? 1 : 0;
}

int main(int argc, char **argv)
{
	const char *tmpdir = getenv("CZT_TMP") ?: "/tmp";
	int go, ret;
	struct czone_destroy d = { 0 };
	struct czone_stat st = { 0 };
	uint64_t a, b;
	char path[256];
	pid_t pb, pa;

	thp_madvise("/sys/kernel/mm/transparent_hugepage/enabled");
	thp_madvise("/sys/kernel/mm/transparent_hugepage/defrag");
	if (czt_create(64 * MB, &a) || czt_create(16 * MB, &b)) {
		czt_result(0, "create: %s", strerror(errno));
		return czt_exit();
	}
	czt_result(1, "created CZones A=%llu B=%llu", (unsigned long long)a,
		   (unsigned long long)b);

	/* B gets a chunk from a task that waits */
	pb = czt_holder(b, 4 * MB, 7, &go);
	CZT_CHECK(pb > 0, "clone3 into B: %s", pb < 0 ? strerror(errno) : "ok");
	if (pb < 0)
		return czt_exit();
	CZT_CHECK(czt_proc_czone(pb) == (long long)b,
		  "/proc/%d/czone shows B", pb);

	pa = czt_clone_into(a);
	if (pa == 0)
		_exit(child_a(a, b, tmpdir));
	CZT_CHECK(pa > 0, "clone3 into A");
	ret = czt_wait(pa);
	CZT_CHECK(ret == 0, "child in A passed (status %d)", ret);

	snprintf(path, sizeof(path), "%s/czt-place", tmpdir);
	unlink(path);

	CZT_CHECK(czt_stat(a, &st) == 0, "stat A");
	CZT_CHECK(st.nr_tasks == 0 && st.nr_chunks > 0 &&
		  st.host_backed_pages > 0 && st.alloc_failures == 0,
		  "stat A: tasks=%llu chunks=%llu used=%llu free=%llu backed=%llu failures=%llu",
		  st.nr_tasks, st.nr_chunks, st.used_pages, st.free_pages,
		  st.host_backed_pages, st.alloc_failures);

	CZT_CHECK(czt_destroy(b, NULL) == -EBUSY, "destroy B with a live task: EBUSY");
	write(go, "g", 1);
	czt_wait(pb);

	ret = czt_destroy(a, &d);
	CZT_CHECK(ret == 0 && d.migrated_pages == 0 && d.failed_pages == 0,
		  "destroy A: ret=%d migrated=%llu failed=%llu chunks=%llu in %llu ns",
		  ret, d.migrated_pages, d.failed_pages, d.released_chunks,
		  d.duration_ns);
	ret = czt_destroy(b, &d);
	CZT_CHECK(ret == 0 && d.migrated_pages == 0,
		  "destroy B: ret=%d migrated=%llu chunks=%llu", ret,
		  d.migrated_pages, d.released_chunks);
	CZT_CHECK(czt_stat(a, &st) == -ENOENT, "stat A after destroy: ENOENT");
	return czt_exit();
}
