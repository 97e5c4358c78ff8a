// SPDX-License-Identifier: GPL-2.0
/*
 * A fault storm against sources that run dry: CZones whose caps add up to
 * far more than the chunk sources hold.  STORMERS tasks fault pages in as
 * fast as they can, on every vCPU: two share CZone A, the others have one
 * CZone each.  Once the sources are empty every one of them must end,
 * killed by its own CZone's OOM killer (SIGKILL), within BOUND seconds
 * of the start; no fault may wait forever for a chunk.  Then every CZone
 * must destroy whole, with every chunk back at its source.
 *
 * Usage: czone_storm [BOUND_SECONDS]   (default 120)
 */
#include "czt.h"
#include <time.h>

#define STORMERS 4
#define CAP (2048UL << 20)	/* more than any test VM's source holds */

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Fault pages in until killed; exits 3 if it cannot map its range */
static void storm(void)
{
	char *p = mmap(NULL, CAP, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

	if (p == MAP_FAILED)
		_exit(3);
	madvise(p, CAP, MADV_NOHUGEPAGE);
	for (;;)
		czt_touch(p, CAP, 1);
}

int main(int argc, char **argv)
{
	int bound = argc > 1 ? atoi(argv[1]) : 120;
	uint64_t ids[STORMERS], fails = 0, kills = 0;
	pid_t pids[STORMERS];
	struct czone_destroy d;
	struct czone_stat st;
	double start, end;
	int i, n = 0, dead;

	for (i = 0; i < STORMERS; i++) {
		/* tasks 0 and 1 share ids[0] */
		if (i == 1) {
			ids[i] = 0;
			continue;
		}
		if (czt_create(CAP, &ids[i])) {
			printf("FAIL: create\n");
			return 1;
		}
	}
	start = now();
	for (i = 0; i < STORMERS; i++) {
		pids[i] = czt_clone_into(ids[i] ?: ids[0]);
		if (pids[i] == 0)
			storm();
		CZT_CHECK(pids[i] > 0, "clone3 storm task %d", i);
	}

	/* Every task ends by SIGKILL within the bound, or is counted as hung */
	for (dead = 0; dead < STORMERS && now() - start < bound; ) {
		int status;
		pid_t pid = waitpid(-1, &status, WNOHANG);

		if (pid <= 0) {
			usleep(100000);
			continue;
		}
		dead++;
		n += WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
	}
	end = now();
	CZT_CHECK(dead == STORMERS, "all %d storm tasks ended within %d s (%d did, %.1f s)",
		  STORMERS, bound, dead, end - start);
	CZT_CHECK(n == dead, "each of them by SIGKILL (%d of %d)", n, dead);
	for (i = 0; i < STORMERS && dead < STORMERS; i++) {
		kill(pids[i], SIGKILL);
		czt_wait(pids[i]);
	}

	for (i = 0; i < STORMERS; i++) {
		if (!ids[i])
			continue;
		if (!czt_stat(ids[i], &st)) {
			fails += st.alloc_failures;
			kills += st.oom_kills;
		}
		CZT_CHECK(czt_destroy(ids[i], &d) == 0 && d.failed_pages == 0,
			  "CZone %llu destroyed whole (%llu chunks released)",
			  (unsigned long long)ids[i],
			  (unsigned long long)d.released_chunks);
		CZT_CHECK(czt_gone_after(ids[i], 10000) >= 0, "CZone %llu gone",
			  (unsigned long long)ids[i]);
	}
	CZT_CHECK(fails > 0 && kills >= STORMERS,
		  "the CZones counted %llu failed allocations and %llu OOM kills",
		  (unsigned long long)fails, (unsigned long long)kills);
	printf("storm: %d tasks ended in %.1f s\n", dead, end - start);
	return czt_exit();
}
