// SPDX-License-Identifier: GPL-2.0
/*
 * Concurrency: workers in one CZone map, touch (THPs included), fork and
 * unmap memory at random, together asking for more than the cap, so that
 * the CZone grows, fills up and OOM-kills while the parent reads its
 * counters and debugfs; a second CZone is created and destroyed in a loop
 * meanwhile.  At the end every task is gone and destroy must release
 * everything without migration.  Best run with several vCPUs.
 *
 * Usage: czone_stress [seconds (10)] [workers (4)]
 */
#include "czt.h"
#include <time.h>

#define MB (1UL << 20)

static uint64_t seed = 1;

static uint64_t rnd(void)
{
	seed ^= seed << 13;
	seed ^= seed >> 7;
	seed ^= seed << 17;
	return seed;
}

static void worker(int n, time_t end)
{
	seed = 0x9e3779b97f4a7c15ULL * (n + 1);
	while (time(NULL) < end) {
		size_t len = (1 + rnd() % 8) * MB;
		char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (p == MAP_FAILED)
			continue;
		if (rnd() % 2)
			madvise(p, len, MADV_HUGEPAGE);
		czt_touch(p, len, n);
		if (rnd() % 8 == 0) {
			pid_t pid = fork();

			if (pid == 0) {
				czt_touch(p, len / 2, n + 1);
				_exit(0);
			}
			if (pid > 0)
				waitpid(pid, NULL, 0);
		}
		munmap(p, len);
	}
}

int main(int argc, char **argv)
{
	int secs = argc > 1 ? atoi(argv[1]) : 10;
	int nw = argc > 2 ? atoi(argv[2]) : 4;
	struct czone_destroy d = { 0 };
	struct czone_stat st = { 0 };
	time_t end = time(NULL) + secs;
	int alive = 0, killed = 0, ret;
	unsigned long cycles = 0, stat_failures = 0, destroy_failures = 0;
	int last_stat_err = 0, last_destroy_err = 0;
	uint64_t id, id2;
	char buf[4096];
	pid_t pids[64];

	if (nw > 64)
		nw = 64;
	if (czt_create(24 * MB, &id)) {
		czt_result(0, "create");
		return czt_exit();
	}
	for (int i = 0; i < nw; i++) {
		pids[i] = czt_clone_into(id);
		if (pids[i] == 0) {
			worker(i, end);
			_exit(0);
		}
	}

	while (time(NULL) < end) {
		int fd;

		ret = czt_stat(id, &st);
		if (ret) {
			stat_failures++;
			last_stat_err = ret;
		}
		snprintf(buf, sizeof(buf), "/sys/kernel/debug/czone/%llu/chunks",
			 (unsigned long long)id);
		fd = open(buf, O_RDONLY);
		if (fd >= 0) {
			while (read(fd, buf, sizeof(buf)) > 0)
				;
			close(fd);
		}
		if (!czt_create(4 * MB, &id2)) {
			pid_t pid = czt_clone_into(id2);

			if (pid == 0) {
				char *p = mmap(NULL, 2 * MB,
					       PROT_READ | PROT_WRITE,
					       MAP_PRIVATE | MAP_ANONYMOUS, -1,
					       0);

				czt_touch(p, 2 * MB, 3);
				_exit(0);
			}
			if (pid > 0)
				czt_wait(pid);
			ret = czt_destroy(id2, NULL);
			if (ret) {
				destroy_failures++;
				last_destroy_err = ret;
			}
			cycles++;
		}
	}

	for (int i = 0; i < nw; i++) {
		ret = czt_wait(pids[i]);
		if (ret == 0)
			alive++;
		else if (ret == 128 + SIGKILL)
			killed++;
	}
	CZT_CHECK(alive + killed == nw,
		  "%d workers: %d finished, %d OOM-killed", nw, alive, killed);
	CZT_CHECK(stat_failures == 0, "%lu stat calls failed (last %d)", stat_failures,
		  last_stat_err);
	CZT_CHECK(destroy_failures == 0, "%lu of %lu destroys alongside failed (last %d)",
		  destroy_failures, cycles, last_destroy_err);
	ret = czt_stat(id, &st);
	CZT_CHECK(ret == 0 && st.nr_tasks == 0 && st.nr_chunks <= 12,
		  "stat: %d tasks=%llu chunks=%llu failures=%llu ooms=%llu", ret,
		  st.nr_tasks, st.nr_chunks, st.alloc_failures, st.oom_kills);
	ret = czt_destroy(id, &d);
	CZT_CHECK(ret == 0 && d.failed_pages == 0 && d.migrated_pages == 0,
		  "destroy: %d migrated=%llu failed=%llu chunks=%llu", ret,
		  d.migrated_pages, d.failed_pages, d.released_chunks);
	CZT_CHECK(cycles > 0, "%lu create/clone/destroy cycles alongside",
		  cycles);
	CZT_CHECK(czt_stat(id, &st) == -ENOENT, "stat after destroy: ENOENT");
	return czt_exit();
}
