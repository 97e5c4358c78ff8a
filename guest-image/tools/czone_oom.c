// SPDX-License-Identifier: GPL-2.0
/*
 * A full CZone, for its tasks alone:
 *  - with no memory cgroup, and in one whose limit is far above the cap,
 *    one of its tasks is OOM-killed instead of hanging or spilling into
 *    other memory (every MiB the task touched before the kill is checked
 *    with pagemap to lie in the CZone's chunks); the CZone counts it and
 *    the memory cgroup reports nothing (memory.events oom and oom_kill);
 *  - no task outside the CZone is a candidate, whatever its oom_score_adj;
 *  - oom_score_adj decides among the CZone's tasks;
 *  - with swap, the CZone's own pages go out before anything is killed;
 *  - GROW lets a task go further.
 *
 * Needs: /dev/czone; cgroup2 (mounted at /sys/fs/cgroup by the test if
 * nothing is mounted there); swap on a loop device (CONFIG_SWAP,
 * CONFIG_BLK_DEV_LOOP, a tmpfs at $CZT_TMP, default /tmp).
 */
#include "czt.h"

#define MB (1UL << 20)
#define CG "/sys/fs/cgroup/czt-oom"

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
	/* with swap, this reads every page back into the CZone */
	for (size_t i = 0; i < mb; i++)
		for (size_t off = 0; off < MB; off += 4096)
			if (p[i * MB + off] != (char)(1 + off / 4096))
				return 4;
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

/*
 * A task in CZone @id (none if 0) and memory cgroup @cgfd (none if < 0)
 * with oom_score_adj @adj that touches @mb MiB, then waits for a byte on
 * *@go.  Returns its pid once the memory is touched, or -1.
 */
static pid_t sleeper(uint64_t id, int cgfd, size_t mb, int adj, int *go)
{
	struct czt_clone_args a;
	int g[2], ready[2];
	char c, path[64], val[16];
	pid_t pid;

	if (pipe(g) || pipe(ready))
		return -1;
	memset(&a, 0, sizeof(a));
	a.exit_signal = SIGCHLD;
	if (id) {
		a.flags |= CLONE_INTO_CZONE;
		a.czone = id;
	}
	if (cgfd >= 0) {
		a.flags |= CLONE_INTO_CGROUP;
		a.cgroup = cgfd;
	}
	pid = czt_clone3(&a, sizeof(a));
	if (pid == 0) {
		czt_map_touched(mb * MB, 7);
		write(ready[1], "r", 1);
		read(g[0], &c, 1);
		_exit(0);
	}
	close(g[0]);
	close(ready[1]);
	if (pid > 0) {
		read(ready[0], &c, 1);
		snprintf(path, sizeof(path), "/proc/%d/oom_score_adj", pid);
		snprintf(val, sizeof(val), "%d", adj);
		if (czt_write(path, val))
			pid = -1;
	}
	close(ready[0]);
	*go = g[1];
	return pid;
}

/* "killed" if @pid died of SIGKILL, "alive" if it still runs */
static const char *fate(pid_t pid)
{
	int st;
	pid_t r = waitpid(pid, &st, WNOHANG);

	if (r == 0)
		return "alive";
	if (r == pid && WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL)
		return "killed";
	return "other";
}

/* Let a sleeper go and reap it */
static void release(pid_t pid, int go)
{
	write(go, "g", 1);
	close(go);
	waitpid(pid, NULL, 0);
}

static void test_memcg_far_above(uint64_t id)
{
	pid_t outside;
	int cgfd, go, ret;

	cgfd = czt_cgroup(CG);
	if (cgfd < 0) {
		czt_result(0, "cgroup2 setup: %s", strerror(errno));
		return;
	}
	CZT_CHECK(!czt_write(CG "/memory.max", "512M"), "memory.max=512M");
	outside = sleeper(0, cgfd, 1, 1000, &go);
	CZT_CHECK(outside > 0, "a task of the memcg outside the CZone, oom_score_adj=1000");

	ret = run_in(id, cgfd, 32);
	CZT_CHECK(ret == 128 + SIGKILL,
		  "memcg at 512M: 32 MiB in a 4 MiB CZone gets SIGKILL (status %d)",
		  ret);
	CZT_CHECK(czt_file_value(CG "/memory.events", "oom ") == 0 &&
		  czt_file_value(CG "/memory.events", "oom_kill ") == 0,
		  "the memcg reports no OOM: memory.events oom=%ld oom_kill=%ld",
		  czt_file_value(CG "/memory.events", "oom "),
		  czt_file_value(CG "/memory.events", "oom_kill "));
	if (outside > 0) {
		CZT_CHECK(!strcmp(fate(outside), "alive"),
			  "the task outside the CZone is no candidate: %s",
			  fate(outside));
		release(outside, go);
	}
	close(cgfd);
	rmdir(CG);
}

/* A small task with oom_score_adj @adj beside a hog in CZone @id */
static void test_score_adj(uint64_t id, int adj, const char *want)
{
	const char *got;
	pid_t pet;
	int go, ret;

	pet = sleeper(id, -1, 1, adj, &go);
	if (pet < 0) {
		czt_result(0, "sleeper with oom_score_adj=%d", adj);
		return;
	}
	ret = run_in(id, -1, 32);
	got = fate(pet);
	CZT_CHECK(!strcmp(got, want),
		  "oom_score_adj=%d: the 1 MiB task beside a 32 MiB hog is %s (want %s)",
		  adj, got, want);
	CZT_CHECK(ret == 128 + SIGKILL, "the hog is killed too (status %d)", ret);
	if (!strcmp(got, "alive"))
		release(pet, go);
	else
		close(go);
}

static void test_swap(void)
{
	struct czone_destroy d = { 0 };
	struct czone_stat st = { 0 };
	struct czt_swap swap;
	uint64_t id;
	int ret;

	if (czt_create(8 * MB, &id) || czt_swap_on(&swap, 64 * MB)) {
		czt_result(0, "create and swapon: %s", strerror(errno));
		return;
	}
	ret = run_in(id, -1, 24);
	czt_stat(id, &st);
	CZT_CHECK(ret == 0 && st.oom_kills == 0,
		  "swap: 24 MiB in an 8 MiB CZone go out to swap and come back intact, no OOM (status %d, ooms=%llu)",
		  ret, st.oom_kills);
	czt_swap_off(&swap);
	ret = czt_destroy(id, &d);
	CZT_CHECK(ret == 0 && d.failed_pages == 0, "swap: destroy %d", ret);
}

int main(void)
{
	struct czone_grow g = { .size = sizeof(g) };
	struct czone_destroy d = { 0 };
	struct czone_stat st = { 0 };
	uint64_t id;
	int ret;

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

	test_memcg_far_above(id);
	test_score_adj(id, 1000, "killed");
	test_score_adj(id, -1000, "alive");

	g.id = id;
	g.bytes = 12 * MB;
	CZT_CHECK(ioctl(czt_dev(), CZONE_IOC_GROW, &g) == 0, "grow to 16 MiB");
	ret = run_in(id, -1, 10);
	CZT_CHECK(ret == 0, "10 MiB fit after grow (status %d)", ret);

	ret = czt_destroy(id, &d);
	CZT_CHECK(ret == 0 && d.failed_pages == 0,
		  "destroy: %d migrated=%llu chunks=%llu", ret,
		  d.migrated_pages, d.released_chunks);

	test_swap();
	return czt_exit();
}
