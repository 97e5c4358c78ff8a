// SPDX-License-Identifier: GPL-2.0
/*
 * Destroy: EBUSY while a task lives; a CZone whose task exited (not yet
 * reaped) is destroyed without migration; tmpfs pages a container left
 * on a tmpfs outside it are migrated out, counted, and keep their data.
 *
 * Needs: /dev/czone, debugfs, a tmpfs at $CZT_TMP (default /tmp).
 */
#include "czt.h"

#define MB (1UL << 20)
#define MAXR 1024

static void test_busy_and_zombie(void)
{
	struct czone_destroy d = { 0 };
	struct czone_stat st = { 0 };
	siginfo_t si;
	int go;
	uint64_t id;
	pid_t pid;

	if (czt_create(16 * MB, &id)) {
		czt_result(0, "create");
		return;
	}
	pid = czt_holder(id, 4 * MB, 1, &go);
	if (pid < 0)
		exit(2);
	CZT_CHECK(czt_stat(id, &st) == 0 && st.nr_tasks == 1 &&
		  st.used_pages >= 1024,
		  "stat with a live task: tasks=%llu used=%llu", st.nr_tasks,
		  st.used_pages);
	CZT_CHECK(czt_destroy(id, NULL) == -EBUSY, "destroy with live task: EBUSY");

	write(go, "g", 1);
	/* wait for the exit, but leave a zombie */
	memset(&si, 0, sizeof(si));
	waitid(P_PID, pid, &si, WEXITED | WNOWAIT);
	CZT_CHECK(czt_proc_czone(pid) == (long long)id,
		  "zombie's /proc/%d/czone still shows %llu", pid,
		  (unsigned long long)id);
	CZT_CHECK(czt_stat(id, &st) == 0 && st.nr_tasks == 0,
		  "zombie does not count: tasks=%llu", st.nr_tasks);
	CZT_CHECK(czt_destroy(id, &d) == 0 && d.migrated_pages == 0 &&
		  d.failed_pages == 0 && d.released_chunks > 0,
		  "destroy with only a zombie: migrated=%llu chunks=%llu in %llu ns",
		  d.migrated_pages, d.released_chunks, d.duration_ns);
	CZT_CHECK(czt_wait(pid) == 0, "zombie reaped");
	CZT_CHECK(czt_destroy(id, NULL) == -ENOENT, "destroy again: ENOENT");
	close(go);
}

static void test_leftover_tmpfs(const char *tmpdir)
{
	static struct czt_range r[MAXR];
	long present, inside, outside;
	struct czone_destroy d = { 0 };
	char path[256];
	size_t len = 8 * MB;
	int fd, n, bad = 0;
	uint64_t id;
	char *p;
	pid_t pid;

	snprintf(path, sizeof(path), "%s/czt-leftover", tmpdir);
	if (czt_create(32 * MB, &id)) {
		czt_result(0, "create");
		return;
	}
	pid = czt_clone_into(id);
	if (pid == 0) {
		char buf[4096];
		int f = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);

		if (f < 0)
			_exit(1);
		for (size_t off = 0; off < len; off += sizeof(buf)) {
			memset(buf, (int)(off / sizeof(buf)) & 0xff,
			       sizeof(buf));
			if (write(f, buf, sizeof(buf)) != sizeof(buf))
				_exit(1);
		}
		close(f);
		_exit(0);
	}
	CZT_CHECK(czt_wait(pid) == 0, "container wrote %s", path);
	n = czt_chunks(id, r, MAXR);

	fd = open(path, O_RDONLY);
	p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
	if (fd < 0 || p == MAP_FAILED) {
		czt_result(0, "map %s", path);
		return;
	}
	for (size_t off = 0; off < len; off += 4096)
		bad += p[off] != (char)((off / 4096) & 0xff);
	czt_pfn_check(p, len, r, n, NULL, 0, &present, &inside, &outside);
	CZT_CHECK(present > 0 && inside == present,
		  "leftover tmpfs file: %ld pages in the CZone", inside);
	munmap(p, len);

	CZT_CHECK(czt_destroy(id, &d) == 0 && d.migrated_pages >= len / 4096 &&
		  d.failed_pages == 0,
		  "destroy migrated the leftover: migrated=%llu failed=%llu chunks=%llu in %llu ns",
		  d.migrated_pages, d.failed_pages, d.released_chunks,
		  d.duration_ns);

	p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
	for (size_t off = 0; off < len; off += 4096)
		bad += p[off] != (char)((off / 4096) & 0xff);
	CZT_CHECK(bad == 0, "tmpfs data intact after migration (%d bad pages)",
		  bad);
	czt_pfn_check(p, len, r, n, NULL, 0, &present, &inside, &outside);
	CZT_CHECK(present > 0 && inside == 0,
		  "migrated pages left the old chunks (%ld of %ld inside)",
		  inside, present);
	munmap(p, len);
	close(fd);
	unlink(path);
}

int main(void)
{
	const char *tmpdir = getenv("CZT_TMP") ?: "/tmp";

	test_busy_and_zombie();
	test_leftover_tmpfs(tmpdir);
	return czt_exit();
}
