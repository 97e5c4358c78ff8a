// SPDX-License-Identifier: GPL-2.0
/*
 * In-guest side of `make bench` for the CZone kernel.  Prints one
 * "key=value ..." line per sample; the host takes medians and ratios.
 *
 *   czone_bench fault SIZE_MIB ROUNDS
 *	4 KiB page-fault cost of touching SIZE_MIB of anonymous memory in a
 *	process inside a CZone and in one outside, alternating.  "cold" is a
 *	fresh CZone that takes its chunks on demand, "warm" one whose chunks
 *	are already there.
 *   czone_bench destroy SIZE_MIB ROUNDS
 *	A container touches SIZE_MIB and exits; then its CZone is destroyed.
 *	Side by side: a plain process touches SIZE_MIB of ZONE_MOVABLE and
 *	exits; then the memory blocks it used are offlined (stock hot-remove)
 *	and onlined again.
 */
#include <dirent.h>
#include <time.h>
#include "czt.h"

#define MIB (1ULL << 20)

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

/* Child body: touch @bytes of anon memory, send the time it took. */
static int touch_and_report(size_t bytes, int thp, int fd)
{
	uint64_t t0, dt;
	char *p;

	p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return 2;
	madvise(p, bytes, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
	t0 = now_ns();
	czt_touch(p, bytes, 1);
	dt = now_ns() - t0;
	return write(fd, &dt, sizeof(dt)) == sizeof(dt) ? 0 : 3;
}

/* Run touch_and_report() in a child cloned into @czone (0: none). */
static int64_t timed_touch(uint64_t czone, size_t bytes, int thp)
{
	uint64_t dt = 0;
	int p[2], rc;
	pid_t pid;

	if (pipe(p))
		return -1;
	pid = czt_clone_into(czone);
	if (pid < 0)
		return -errno;
	if (pid == 0)
		_exit(touch_and_report(bytes, thp, p[1]));
	close(p[1]);
	rc = czt_wait(pid);
	if (read(p[0], &dt, sizeof(dt)) != sizeof(dt) || rc)
		dt = 0;
	close(p[0]);
	return rc ? -EIO : (int64_t)dt;
}

static int bench_fault(size_t mib, int rounds)
{
	size_t bytes = mib * MIB;
	uint64_t warm;
	int r;

	if (czt_create(bytes + 8 * MIB, &warm))
		return 1;
	if (timed_touch(warm, bytes, 0) < 0)	/* fills the warm CZone */
		return 1;
	for (r = 0; r < rounds; r++) {
		int64_t in_warm, in_cold, out;
		uint64_t cold;

		if (czt_create(bytes + 8 * MIB, &cold))
			return 1;
		/* alternate the order so neither side always runs first */
		if (r & 1) {
			out = timed_touch(0, bytes, 0);
			in_warm = timed_touch(warm, bytes, 0);
			in_cold = timed_touch(cold, bytes, 0);
		} else {
			in_cold = timed_touch(cold, bytes, 0);
			in_warm = timed_touch(warm, bytes, 0);
			out = timed_touch(0, bytes, 0);
		}
		czt_destroy(cold, NULL);
		if (in_warm < 0 || in_cold < 0 || out < 0)
			return 1;
		printf("fault size_mib=%zu round=%d outside_ns=%lld warm_ns=%lld cold_ns=%lld\n",
		       mib, r, (long long)out, (long long)in_warm,
		       (long long)in_cold);
		fflush(stdout);
	}
	czt_destroy(warm, NULL);
	return 0;
}

/* Memory block size from sysfs, in bytes. */
static uint64_t block_bytes(void)
{
	unsigned long long v = 0;
	FILE *f = fopen("/sys/devices/system/memory/block_size_bytes", "r");

	if (f) {
		if (fscanf(f, "%llx", &v) != 1)
			v = 0;
		fclose(f);
	}
	return v;
}

static int set_block_state(unsigned long blk, const char *state)
{
	char path[96];
	int fd, ok;

	snprintf(path, sizeof(path), "/sys/devices/system/memory/memory%lu/state",
		 blk);
	fd = open(path, O_WRONLY);
	if (fd < 0)
		return -errno;
	ok = write(fd, state, strlen(state)) == (ssize_t)strlen(state);
	close(fd);
	return ok ? 0 : -errno;
}

/*
 * Child body for the stock case: touch, then report the memory blocks
 * holding its pages (most used first is not needed: the parent offlines
 * every block the child used, which is what stock hot-remove must do to
 * give those bytes back).
 */
static int touch_and_list_blocks(size_t bytes, uint64_t blk, int fd)
{
	long psz = sysconf(_SC_PAGESIZE);
	static unsigned char used[65536];
	int pm = open("/proc/self/pagemap", O_RDONLY);
	char *p;

	p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED || pm < 0)
		return 2;
	czt_touch(p, bytes, 2);
	for (size_t i = 0; i < bytes / psz; i++) {
		uint64_t e, b;

		if (pread(pm, &e, 8, ((uintptr_t)p / psz + i) * 8) != 8)
			return 3;
		if (!(e & (1ULL << 63)))
			continue;
		b = (e & ((1ULL << 55) - 1)) * psz / blk;
		if (b < sizeof(used))
			used[b] = 1;
	}
	for (uint32_t b = 0; b < sizeof(used); b++)
		if (used[b] && write(fd, &b, sizeof(b)) != sizeof(b))
			return 4;
	return 0;
}

static int bench_destroy_one(size_t mib, int round)
{
	size_t bytes = mib * MIB;
	uint64_t blk = block_bytes(), id, t0, wall_czone, wall_off = 0;
	struct czone_destroy d;
	uint32_t blocks[4096];
	int p[2], n = 0, failed = 0;
	pid_t pid;

	/* slack for the child's own stack and data pages */
	if (!blk || czt_create(bytes + 8 * MIB, &id))
		return 1;
	if (timed_touch(id, bytes, 0) < 0)
		return 1;
	t0 = now_ns();
	if (czt_destroy(id, &d))
		return 1;
	wall_czone = now_ns() - t0;

	if (pipe(p))
		return 1;
	pid = fork();
	if (pid == 0)
		_exit(touch_and_list_blocks(bytes, blk, p[1]));
	close(p[1]);
	while (n < 4096 && read(p[0], &blocks[n], sizeof(blocks[0])) == sizeof(blocks[0]))
		n++;
	close(p[0]);
	if (czt_wait(pid))
		return 1;
	for (int i = 0; i < n; i++) {
		t0 = now_ns();
		if (set_block_state(blocks[i], "offline"))
			failed++;
		wall_off += now_ns() - t0;
	}
	for (int i = 0; i < n; i++)
		set_block_state(blocks[i], "online_movable");
	printf("destroy size_mib=%zu round=%d czone_ns=%llu czone_kernel_ns=%llu migrated=%llu released_chunks=%llu offline_ns=%llu offline_blocks=%d offline_failed=%d block_mib=%llu\n",
	       mib, round, (unsigned long long)wall_czone,
	       (unsigned long long)d.duration_ns,
	       (unsigned long long)d.migrated_pages,
	       (unsigned long long)d.released_chunks,
	       (unsigned long long)wall_off, n, failed,
	       (unsigned long long)(blk / MIB));
	fflush(stdout);
	return 0;
}

int main(int argc, char **argv)
{
	int rounds, rc = 0;
	size_t mib;

	if (argc != 4 || (mib = strtoul(argv[2], NULL, 0)) == 0 ||
	    (rounds = atoi(argv[3])) <= 0) {
		fprintf(stderr, "usage: %s fault|destroy SIZE_MIB ROUNDS\n", argv[0]);
		return 2;
	}
	if (!strcmp(argv[1], "fault"))
		return bench_fault(mib, rounds);
	if (strcmp(argv[1], "destroy")) {
		fprintf(stderr, "%s: unknown benchmark %s\n", argv[0], argv[1]);
		return 2;
	}
	for (int r = 0; r < rounds && !rc; r++)
		rc = bench_destroy_one(mib, r);
	return rc;
}
