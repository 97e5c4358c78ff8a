// SPDX-License-Identifier: GPL-2.0
/*
 * czone_pages: where do the anonymous pages of a process live?
 *
 *   czone_pages PID ID [OTHER_ID...]
 *
 * Walks every mapping of PID through /proc/PID/pagemap and /proc/kpageflags
 * and counts its resident anonymous pages (the zero page excluded): how many
 * lie in the chunks of CZone ID, how many in the chunks of each OTHER_ID, and
 * how many in none of them.  Prints PASS when there is at least one such
 * page and every one of them is in ID's chunks, FAIL otherwise.
 */
#include "czt.h"

#define MAXR		4096
#define MAXOTHERS	32
#define KPF_ANON	12
#define KPF_ZERO_PAGE	24

static struct czt_range own[MAXR], others[MAXR];

int main(int argc, char **argv)
{
	long present = 0, inside = 0, outside = 0, nowhere = 0;
	int nown, nothers = 0, pm, kf;
	char path[64], line[512];
	pid_t pid;
	FILE *maps;

	if (argc < 3 || argc > 3 + MAXOTHERS) {
		fprintf(stderr, "usage: czone_pages PID ID [OTHER_ID...]\n");
		return 2;
	}
	pid = atoi(argv[1]);
	nown = czt_chunks(strtoull(argv[2], NULL, 0), own, MAXR);
	for (int i = 3; i < argc; i++) {
		int n = czt_chunks(strtoull(argv[i], NULL, 0), others + nothers,
				   MAXR - nothers);

		if (n > 0)
			nothers += n;
	}
	snprintf(path, sizeof(path), "/proc/%d/maps", pid);
	maps = fopen(path, "r");
	snprintf(path, sizeof(path), "/proc/%d/pagemap", pid);
	pm = open(path, O_RDONLY);
	kf = open("/proc/kpageflags", O_RDONLY);
	if (nown < 0 || !maps || pm < 0 || kf < 0) {
		czt_result(0, "pid %d, CZone %s: cannot read chunks, maps, pagemap or kpageflags",
			   pid, argv[2]);
		return czt_exit();
	}
	while (fgets(line, sizeof(line), maps)) {
		unsigned long start, end;

		if (sscanf(line, "%lx-%lx", &start, &end) != 2 ||
		    strstr(line, "[vsyscall]") || strstr(line, "[vvar]") ||
		    strstr(line, "[vdso]"))
			continue;
		for (unsigned long va = start; va < end; va += 4096) {
			uint64_t e, flags, pfn;

			if (pread(pm, &e, 8, va / 4096 * 8) != 8 ||
			    !(e & (1ULL << 63)))
				continue;
			pfn = e & ((1ULL << 55) - 1);
			if (pread(kf, &flags, 8, pfn * 8) != 8 ||
			    !(flags & (1ULL << KPF_ANON)) ||
			    (flags & (1ULL << KPF_ZERO_PAGE)))
				continue;
			present++;
			if (czt_in_ranges(pfn, own, nown))
				inside++;
			else if (czt_in_ranges(pfn, others, nothers))
				outside++;
			else
				nowhere++;
		}
	}
	CZT_CHECK(present > 0 && inside == present,
		  "pid %d: %ld anonymous pages resident, %ld in CZone %s, %ld in the others, %ld elsewhere",
		  pid, present, inside, argv[2], outside, nowhere);
	return czt_exit();
}
