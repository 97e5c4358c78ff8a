// SPDX-License-Identifier: GPL-2.0
/*
 * Huge pages inside a CZone: a CZone task's range of small pages is
 * collapsed by MADV_COLLAPSE, and another by khugepaged.  Each THP lies in
 * one of the CZone's chunks (pagemap: 512 consecutive PFNs from a 2 MiB
 * boundary, inside the CZone's chunk ranges) and is PMD-mapped (smaps
 * AnonHugePages).  The CZone grows by a chunk for the collapse, within
 * its cap; a collapse beyond the cap fails with ENOMEM, as upstream fails
 * when no huge page is available.
 *
 * Needs: /dev/czone, CONFIG_TRANSPARENT_HUGEPAGE, debugfs.
 */
#include "czt.h"

#define MB (1UL << 20)
#define HP (2 * MB)
#define MAXR 64
#define THP "/sys/kernel/mm/transparent_hugepage/"
#define KHUGEPAGED THP "khugepaged/"

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25
#endif

/*
 * @len of small pages from a 2 MiB boundary, touched; for khugepaged
 * (@khugepaged) marked MADV_HUGEPAGE once touched
 */
static char *small_pages(size_t len, int khugepaged)
{
	char *p = mmap(NULL, len + HP, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	p = (char *)(((uintptr_t)p + HP - 1) & ~(HP - 1));
	if (khugepaged)
		madvise(p, len, MADV_NOHUGEPAGE);
	czt_touch(p, len, 3);
	if (khugepaged)
		madvise(p, len, MADV_HUGEPAGE);
	return p;
}

/* AnonHugePages of the mapping holding @p, in kB, or -1 */
static long anon_huge_kb(char *p)
{
	unsigned long start, end;
	char line[256];
	long kb = -1;
	int in = 0;
	FILE *f = fopen("/proc/self/smaps", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%lx-%lx ", &start, &end) == 2 &&
		    strchr(line, '-') < strchr(line, ' ')) {
			in = (uintptr_t)p >= start && (uintptr_t)p < end;
			continue;
		}
		if (in && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
			break;
	}
	fclose(f);
	return kb;
}

/* 0 if [@p, @p + 2 MiB) is one THP in a chunk of CZone @id */
static int thp_in_czone(uint64_t id, char *p)
{
	static struct czt_range r[MAXR];
	int fd = open("/proc/self/pagemap", O_RDONLY);
	uint64_t first = 0, e;
	int n = czt_chunks(id, r, MAXR);

	if (fd < 0 || n < 0)
		return -1;
	for (size_t i = 0; i < HP / 4096; i++) {
		if (pread(fd, &e, 8, ((uintptr_t)p / 4096 + i) * 8) != 8 ||
		    !(e & (1ULL << 63)))
			goto fail;
		e &= (1ULL << 55) - 1;
		if (!i)
			first = e;
		if (e != first + i || !czt_in_ranges(e, r, n))
			goto fail;
	}
	close(fd);
	return first % (HP / 4096) ? -1 : 0;
fail:
	close(fd);
	return -1;
}

/* In CZone @id: 4 MiB of small pages collapsed by MADV_COLLAPSE */
static int collapse_child(uint64_t id)
{
	char *p = small_pages(2 * HP, 0);

	if (!p)
		return 10;
	if (anon_huge_kb(p) != 0)
		return 11;
	if (madvise(p, 2 * HP, MADV_COLLAPSE))
		return 12;
	if (anon_huge_kb(p) < 2 * HP / 1024)
		return 13;
	if (thp_in_czone(id, p) || thp_in_czone(id, p + HP))
		return 14;
	for (size_t off = 0; off < 2 * HP; off += 4096)
		if (p[off] != (char)(3 + off / 4096))
			return 15;
	return 0;
}

/* In CZone @id, full: the collapse finds no huge page */
static int full_child(void)
{
	char *p = small_pages(HP, 0);
	char *more = mmap(NULL, MB, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (!p || more == MAP_FAILED)
		return 10;
	/* 3 MiB of small pages leave neither chunk of the 4 MiB cap empty */
	czt_touch(more, MB, 4);
	if (!madvise(p, HP, MADV_COLLAPSE))
		return 16;
	return errno == ENOMEM ? 0 : 100 + errno;
}

/* In CZone @id: khugepaged collapses 2 MiB within 60 s */
static int khugepaged_child(uint64_t id)
{
	char *p = small_pages(HP, 1);

	if (!p)
		return 10;
	for (int i = 0; i < 600 && anon_huge_kb(p) < HP / 1024; i++)
		usleep(100000);
	if (anon_huge_kb(p) < HP / 1024)
		return 17;
	return thp_in_czone(id, p) ? 14 : 0;
}

static int run(uint64_t id, int what)
{
	pid_t pid = czt_clone_into(id);

	if (pid < 0)
		return -errno;
	if (pid == 0) {
		alarm(120);
		_exit(what == 0 ? collapse_child(id) :
		      what == 1 ? full_child() : khugepaged_child(id));
	}
	return czt_wait(pid);
}

/*
 * Destroy CZone @id; a page khugepaged still holds for a moment keeps it
 * dying, and a later destroy finishes it.  Returns the attempts, or -1.
 */
static int destroy(uint64_t id)
{
	struct czone_destroy d = { 0 };

	for (int i = 1; i <= 25; i++) {
		if (czt_destroy(id, &d) && errno != ENOENT)
			return -1;
		if (!d.failed_pages)
			return i;
		usleep(200000);
	}
	return -1;
}

/*
 * Case @what in a new CZone of @cap bytes, destroyed afterwards: its
 * status, or -1; *@attempts is what destroy() returned
 */
static int in_new_czone(uint64_t cap, int what, int *attempts)
{
	uint64_t id;
	int ret;

	*attempts = -1;
	if (czt_create(cap, &id))
		return -1;
	ret = run(id, what);
	*attempts = destroy(id);
	return ret;
}

int main(void)
{
	int ret, attempts;

	/* no THP at fault and no khugepaged until the khugepaged case */
	if (czt_write(THP "enabled", "never") ||
	    czt_write(KHUGEPAGED "scan_sleep_millisecs", "100") ||
	    czt_write(KHUGEPAGED "alloc_sleep_millisecs", "100") ||
	    czt_write(KHUGEPAGED "pages_to_scan", "4096")) {
		czt_result(0, "THP sysfs: %s", strerror(errno));
		return czt_exit();
	}

	ret = in_new_czone(16 * MB, 0, &attempts);
	CZT_CHECK(ret == 0 && attempts == 1,
		  "MADV_COLLAPSE: 4 MiB of small pages become two THPs in the CZone's chunks (status %d, destroy attempts %d)",
		  ret, attempts);
	/* a CZone with no empty chunk and no room to grow */
	ret = in_new_czone(4 * MB, 1, &attempts);
	CZT_CHECK(ret == 0 && attempts == 1,
		  "MADV_COLLAPSE in a full CZone fails with ENOMEM (status %d, destroy attempts %d)",
		  ret, attempts);

	if (czt_write(THP "enabled", "madvise")) {
		czt_result(0, "THP enabled=madvise: %s", strerror(errno));
		return czt_exit();
	}
	ret = in_new_czone(16 * MB, 2, &attempts);
	CZT_CHECK(ret == 0 && attempts >= 1,
		  "khugepaged: 2 MiB of small pages become a THP in the CZone's chunks (status %d, destroy attempts %d)",
		  ret, attempts);
	return czt_exit();
}
