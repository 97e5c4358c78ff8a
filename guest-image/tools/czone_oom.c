// SPDX-License-Identifier: GPL-2.0
/*
 * A full CZone: its task is OOM-killed (by its memory cgroup, or directly
 * when in the root memory cgroup) instead of hanging or spilling into
 * other memory (every MiB it touched before the kill is checked with
 * pagemap to lie in the CZone's chunks); failures are counted; GROW lets
 * it go further.
 *
 * Needs: /dev/czone; cgroup2 (mounted at /sys/fs/cgroup by the test if
 * nothing is mounted there).
 */
#include "czt.h"

#define MB (1UL << 20)

#define MAXR 64

/*
 * Child: touch @mb MiB of anonymous memory one MiB at a time, each MiB
 * checked with pagemap to lie in CZone @id's chunks (nothing spills into
 * other memory before the kill); exit 0 if it survives, 2 on a spill.
 */
static int hog(uint64_t id, size_t mb)
{
	static struct czt_range r[MAXR];
	char *p = mmap(NULL, mb * MB, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	long present, inside, outside;
	int n;

	if (p == MAP_FAILED)
		return 1;
	madvise(p, mb * MB, MADV_NOHUGEPAGE);
	for (size_t i = 0; i < mb; i++) {
		czt_touch(p + i * MB, MB, 1);
		n = czt_chunks(id, r, MAXR);
		if (n < 0 || czt_pfn_check(p + i * MB, MB, r, n, NULL, 0, &present,
					   &inside, &outside))
			return 3;
		if (inside != present)
			return 2;
	}
	return 0;
}

static int run_in(uint64_t id, int cgfd, size_t mb)
{
	struct czt_clone_args a;
	pid_t pid;

	memset(&a, 0, sizeof(a));
	a.exit_signal = SIGCHLD;
	a.flags = CLONE_INTO_CZONE;
	a.czone = id;
	if (cgfd >= 0) {
		a.flags |= CLONE_INTO_CGROUP;
		a.cgroup = cgfd;
	}
	pid = czt_clone3(&a, sizeof(a));
	if (pid < 0)
		return -errno;
	if (pid == 0) {
		alarm(120);
		_exit(hog(id, mb));
	}
	return czt_wait(pid);
}

int main(void)
{
	struct czone_grow g = { .size = sizeof(g) };
	struct czone_destroy d = { 0 };
	struct czone_stat st = { 0 };
	uint64_t id;
	int ret, cgfd;

	if (czt_create(4 * MB, &id)) {
		czt_result(0, "create");
		return czt_exit();
	}

	ret = run_in(id, -1, 32);
	CZT_CHECK(ret == 128 + SIGKILL,
		  "root memcg: 32 MiB in a 4 MiB CZone gets SIGKILL (status %d)",
		  ret);
	czt_stat(id, &st);
	CZT_CHECK(st.alloc_failures > 0 && st.oom_kills > 0 &&
		  st.nr_chunks <= 2,
		  "counted: failures=%llu ooms=%llu chunks=%llu",
		  st.alloc_failures, st.oom_kills, st.nr_chunks);

	cgfd = czt_cgroup("/sys/fs/cgroup/czt-oom");
	if (cgfd < 0) {
		czt_result(0, "cgroup2 setup: %s", strerror(errno));
	} else {
		ret = run_in(id, cgfd, 32);
		CZT_CHECK(ret == 128 + SIGKILL,
			  "memcg: 32 MiB in a 4 MiB CZone gets SIGKILL (status %d)",
			  ret);
		CZT_CHECK(czt_file_value("/sys/fs/cgroup/czt-oom/memory.events", "oom_kill ") >= 1, "memcg memory.events oom_kill=%ld",
			  czt_file_value("/sys/fs/cgroup/czt-oom/memory.events", "oom_kill "));
		close(cgfd);
		rmdir("/sys/fs/cgroup/czt-oom");
	}

	g.id = id;
	g.bytes = 12 * MB;
	CZT_CHECK(ioctl(czt_dev(), CZONE_IOC_GROW, &g) == 0, "grow to 16 MiB");
	ret = run_in(id, -1, 10);
	CZT_CHECK(ret == 0, "10 MiB fit after grow (status %d)", ret);

	ret = czt_destroy(id, &d);
	CZT_CHECK(ret == 0 && d.failed_pages == 0,
		  "destroy: %d migrated=%llu chunks=%llu", ret,
		  d.migrated_pages, d.released_chunks);
	return czt_exit();
}
