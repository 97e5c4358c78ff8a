// SPDX-License-Identifier: GPL-2.0
/*
 * A dying CZone finishes by itself:
 *  - pages a pipe holds (vmsplice) keep a destroyed CZone dying; once the
 *    pipe lets them go, the CZone disappears without another destroy;
 *  - a hardware-poisoned page (MADV_HWPOISON) does not keep a destroyed
 *    CZone dying: its chunk is quarantined and the destroy finishes.
 *
 * Needs: /dev/czone; CONFIG_MEMORY_FAILURE for the second part.
 */
#include "czt.h"
#include <sys/uio.h>

#define PG 4096UL
#define NPAGES 16

#ifndef MADV_HWPOISON
#define MADV_HWPOISON 100
#endif

static void test_pipe(void)
{
	struct czone_destroy d = { 0 };
	struct czone_stat st = { 0 };
	static char buf[NPAGES * PG];
	size_t got = 0;
	uint64_t id;
	int p[2], ret;
	pid_t pid;

	if (pipe(p) || czt_create(4 << 20, &id)) {
		czt_result(0, "pipe, create: %s", strerror(errno));
		return;
	}
	pid = czt_clone_into(id);
	if (pid == 0) {
		char *m = czt_map_touched(NPAGES * PG, 5);
		struct iovec iov = { m, NPAGES * PG };

		/* the pipe takes references on the pages themselves */
		_exit(vmsplice(p[1], &iov, 1, 0) == NPAGES * PG ? 0 : 3);
	}
	close(p[1]);
	ret = czt_wait(pid);
	CZT_CHECK(ret == 0, "a task spliced %lu of its pages into a pipe and exited (status %d)",
		  NPAGES, ret);

	ret = czt_destroy(id, &d);
	CZT_CHECK(ret == 0 && d.failed_pages >= NPAGES,
		  "destroy: %d, the %lu pages the pipe holds kept (failed=%llu)",
		  ret, NPAGES, d.failed_pages);
	ret = czt_stat(id, &st);
	CZT_CHECK(ret == 0 && (st.state & CZONE_STATE_DYING),
		  "the CZone is dying (%d, state=%u)", ret, st.state);

	while (got < sizeof(buf)) {
		ssize_t n = read(p[0], buf + got, sizeof(buf) - got);

		if (n <= 0)
			break;
		got += n;
	}
	close(p[0]);
	ret = 0;
	for (size_t off = 0; off < got; off += PG)
		ret |= buf[off] != (char)(5 + off / PG);
	CZT_CHECK(got == sizeof(buf) && !ret, "the pipe gave back the data intact");
	CZT_CHECK(czt_gone_after(id, 10000) >= 0,
		  "with the pipe drained the CZone finished by itself within 10 s");
}

static void test_hwpoison(void)
{
	struct czone_destroy d = { 0 };
	uint64_t id;
	int ret;
	pid_t pid;

	if (czt_create(4 << 20, &id)) {
		czt_result(0, "create");
		return;
	}
	pid = czt_clone_into(id);
	if (pid == 0) {
		char *m = czt_map_touched(NPAGES * PG, 9);

		_exit(madvise(m + 3 * PG, PG, MADV_HWPOISON) ? 100 + errno : 0);
	}
	/* the injection acts as a machine check on the task: SIGBUS */
	ret = czt_wait(pid);
	CZT_CHECK(ret == 0 || ret == 128 + SIGBUS,
		  "a task poisoned one of its pages with MADV_HWPOISON (status %d)",
		  ret);
	ret = czt_destroy(id, &d);
	CZT_CHECK(ret == 0 && d.failed_pages == 0,
		  "destroy: %d, failed=%llu: the poisoned page's chunk is quarantined",
		  ret, d.failed_pages);
	CZT_CHECK(czt_gone_after(id, 0) == 0, "the CZone is gone at once");
}

int main(void)
{
	test_pipe();
	test_hwpoison();
	return czt_exit();
}
