// SPDX-License-Identifier: GPL-2.0
/*
 * Reclaim racing with faults, frees and destroys, for a VM with several
 * vCPUs and a virtio-czone device (discards need a host):
 *  - WORKERS tasks in CZone A fault pages in, write them, free 64 KiB
 *    runs with MADV_DONTNEED and fault them in again, at random; every
 *    page is verified each time it is read, and a page faulted in again
 *    (possibly one the host discarded) must read as zeroes;
 *  - a task outside calls CZONE_IOC_RECLAIM on A over and over;
 *  - another creates CZone B, fills 4 MiB of it from a child and destroys
 *    it, over and over.
 * In the end A is destroyed whole and every counter must add up.
 *
 * Usage: czone_race [SECONDS]   (default 20)
 */
#include "czt.h"
#include <time.h>

#define PG 4096UL
#define WORKERS 3
#define PAGES 2048		/* 8 MiB per worker */
#define RUN 16			/* pages freed at once */

static uint64_t word(int w, size_t i, uint32_t gen)
{
	return ((uint64_t)w << 56) ^ ((uint64_t)gen << 24) ^ i ^ 0x5a5a;
}

/* Returns 0, or the failure: 1 stale data, 2 wrong data, 3 setup */
static int worker(int w, time_t end)
{
	static uint32_t gen[PAGES];
	uint32_t g = 0, seed = 0x9e3779b9u * (w + 1);
	uint64_t *p;
	char *m;

	m = mmap(NULL, PAGES * PG, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (m == MAP_FAILED)
		return 3;
	madvise(m, PAGES * PG, MADV_NOHUGEPAGE);
	while (time(NULL) < end) {
		size_t i;

		seed = seed * 1103515245u + 12345u;
		i = (seed >> 8) % PAGES;
		p = (uint64_t *)(m + i * PG);
		if (!gen[i]) {
			for (size_t k = 0; k < PG / 8; k++)
				if (p[k])
					return 1;
			gen[i] = ++g;
			p[0] = p[PG / 8 - 1] = word(w, i, gen[i]);
		} else if (p[0] != word(w, i, gen[i]) ||
			   p[PG / 8 - 1] != word(w, i, gen[i])) {
			return 2;
		}
		if (!(seed & 0x3f0)) {
			size_t r = (seed >> 12) % (PAGES / RUN) * RUN;

			madvise(m + r * PG, RUN * PG, MADV_DONTNEED);
			memset(&gen[r], 0, RUN * sizeof(gen[0]));
		}
	}
	for (size_t i = 0; i < PAGES; i++) {
		p = (uint64_t *)(m + i * PG);
		if (gen[i] && p[0] != word(w, i, gen[i]))
			return 2;
	}
	return 0;
}

static long reclaimer(uint64_t id, time_t end, long *discarded)
{
	struct czone_reclaim r;
	long n = 0;

	*discarded = 0;
	while (time(NULL) < end) {
		memset(&r, 0, sizeof(r));
		r.size = sizeof(r);
		r.id = id;
		if (ioctl(czt_dev(), CZONE_IOC_RECLAIM, &r))
			return -errno;
		*discarded += r.discarded_pages;
		n++;
	}
	return n;
}

static long churner(time_t end)
{
	struct czone_destroy d;
	uint64_t id;
	long n = 0;
	pid_t pid;

	while (time(NULL) < end) {
		if (czt_create(8 << 20, &id))
			return -1;
		pid = czt_clone_into(id);
		if (pid == 0) {
			czt_map_touched(4 << 20, 1);
			_exit(0);
		}
		if (czt_wait(pid) || czt_destroy(id, &d) || d.failed_pages)
			return -2;
		n++;
	}
	return n;
}

int main(int argc, char **argv)
{
	int secs = argc > 1 ? atoi(argv[1]) : 20, status[WORKERS], ret;
	time_t end = time(NULL) + secs;
	struct czone_destroy d = { 0 };
	struct czone_stat st = { 0 };
	pid_t pids[WORKERS], helper;
	long reclaims, discarded, cycles;
	int out[2];
	uint64_t id;

	if (czt_create(64 << 20, &id) || pipe(out)) {
		czt_result(0, "create");
		return czt_exit();
	}
	for (int w = 0; w < WORKERS; w++) {
		pids[w] = czt_clone_into(id);
		if (pids[w] == 0)
			_exit(worker(w, end));
	}
	helper = fork();
	if (helper == 0) {
		cycles = churner(end);
		write(out[1], &cycles, sizeof(cycles));
		_exit(0);
	}
	reclaims = reclaimer(id, end, &discarded);
	for (int w = 0; w < WORKERS; w++)
		status[w] = czt_wait(pids[w]);
	czt_wait(helper);
	if (read(out[0], &cycles, sizeof(cycles)) != sizeof(cycles))
		cycles = -3;

	for (int w = 0; w < WORKERS; w++)
		CZT_CHECK(status[w] == 0,
			  "worker %d: every page verified, refaulted pages zero (status %d: 1 stale, 2 wrong)",
			  w, status[w]);
	CZT_CHECK(reclaims > 0 && discarded > 0,
		  "reclaim ran %ld times beside them and discarded %ld pages",
		  reclaims, discarded);
	CZT_CHECK(cycles > 0, "CZone B created, filled and destroyed %ld times beside them",
		  cycles);

	ret = czt_stat(id, &st);
	CZT_CHECK(ret == 0 && st.used_pages == 0 && st.nr_tasks == 0 &&
		  st.host_backed_pages <= st.nr_chunks * (st.chunk_bytes / PG) &&
		  st.free_pages == st.nr_chunks * (st.chunk_bytes / PG),
		  "counters add up: chunks=%llu used=%llu free=%llu backed=%llu",
		  st.nr_chunks, st.used_pages, st.free_pages,
		  st.host_backed_pages);
	ret = czt_destroy(id, &d);
	CZT_CHECK(ret == 0 && d.failed_pages == 0 && d.migrated_pages == 0,
		  "destroy A: %d migrated=%llu failed=%llu", ret,
		  d.migrated_pages, d.failed_pages);
	return czt_exit();
}
