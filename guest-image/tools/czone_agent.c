// SPDX-License-Identifier: GPL-2.0
/*
 * czone_agent: containers on command, for the host's tests and benchmarks.
 *
 * Reads one command per line on stdin, answers one line on stdout:
 * "ok ..." or "err <errno> <what>".  A container is a child task, cloned
 * into a CZone (or into none with ID 0), that owns one anonymous mapping
 * and touches, frees and verifies it when told.  Each touched page holds
 * a word derived from the container's name and the page index, so that
 * verify proves the data intact; a punched page must read as zero.
 *
 *   create CAP_MIB                 -> ok ID
 *   spawn NAME CZID MAX_MIB [nothp] -> ok PID
 *   touch NAME MIB                 -> ok TOUCHED_KIB (MIB 0: just report it)
 *   interleave STEP_KIB MIB NAME.. -> ok   (round robin, STEP_KIB each)
 *   free NAME MIB                  -> ok TOUCHED_KIB (drops the top MIB)
 *   punch NAME STEP_KIB            -> ok FREED_KIB (every other STEP_KIB)
 *   verify NAME                    -> ok PAGES
 *   kill NAME                      -> ok  (SIGKILL, reaped)
 *   destroy ID                     -> ok released= migrated= failed= ns=
 *   reclaim ID                     -> ok released= discarded= failed= ns=
 *   stat ID                        -> ok chunks= used= free= backed= tasks=
 *   quit
 */
#include "czt.h"
#include <ctype.h>

#ifndef CZONE_IOC_RECLAIM
#error "needs the CZone UAPI with CZONE_IOC_RECLAIM"
#endif

#define MAX_CTRS	64
#define PAGE		4096UL

struct ctr {
	char name[32];
	pid_t pid;
	int cmd, reply;		/* pipes to and from the child */
};

static struct ctr ctrs[MAX_CTRS];

static void reply(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

static void reply_err(int err, const char *what)
{
	reply("err %s %s", strerrorname_np(err) ?: "E?", what);
}

/* ---- the container side ---- */

static uint64_t page_word(uint32_t tag, uint64_t idx)
{
	return ((uint64_t)tag << 40) ^ (idx * 0x9e3779b97f4a7c15ULL) ^ idx;
}

static uint32_t name_tag(const char *name)
{
	uint32_t h = 2166136261u;

	for (; *name; name++)
		h = (h ^ (uint8_t)*name) * 16777619u;
	return h & 0xffffff;
}

/* Was page @idx punched by "P step"?  The odd steps are. */
static int punched(size_t idx, size_t step)
{
	return step && (idx * PAGE / step) % 2;
}

/* Serve "T kib", "F kib", "P kib", "V" on @in, answer a number on @out */
static void ctr_main(const char *name, size_t max, int nothp, int in, int out)
{
	uint32_t tag = name_tag(name);
	size_t touched = 0, step = 0;
	char line[64];
	char *p;

	p = mmap(NULL, max, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (p == MAP_FAILED)
		_exit(2);
	if (nothp)
		madvise(p, max, MADV_NOHUGEPAGE);
	for (;;) {
		long long arg = 0, res;
		ssize_t n = read(in, line, sizeof(line) - 1);

		if (n <= 0)
			_exit(0);
		line[n] = '\0';
		sscanf(line + 1, "%lld", &arg);
		switch (line[0]) {
		case 'T': {
			size_t add = (size_t)arg << 10;

			if (touched + add > max || step) {
				res = -ENOSPC;
				break;
			}
			for (size_t off = touched; off < touched + add; off += PAGE)
				*(uint64_t *)(p + off) = page_word(tag, off / PAGE);
			touched += add;
			res = touched >> 10;
			break;
		}
		case 'F': {
			size_t drop = (size_t)arg << 10;

			if (drop > touched || step) {
				res = -EINVAL;
				break;
			}
			touched -= drop;
			res = madvise(p + touched, drop, MADV_DONTNEED) ?
			      -errno : (long long)(touched >> 10);
			break;
		}
		case 'P':
			step = (size_t)arg << 10;
			res = 0;
			if (!step || step % PAGE || step > touched) {
				step = 0;
				res = -EINVAL;
				break;
			}
			for (size_t off = step; off < touched; off += 2 * step) {
				size_t len = touched - off < step ? touched - off : step;

				if (madvise(p + off, len, MADV_DONTNEED)) {
					res = -errno;
					break;
				}
				res += len >> 10;
			}
			break;
		case 'V':
			res = touched / PAGE;
			for (size_t off = 0; off < touched; off += PAGE)
				if (*(uint64_t *)(p + off) !=
				    (punched(off / PAGE, step) ? 0 :
				     page_word(tag, off / PAGE))) {
					res = -(long long)(off / PAGE) - 1000;
					break;
				}
			break;
		default:
			res = -EINVAL;
		}
		n = snprintf(line, sizeof(line), "%lld\n", res);
		if (write(out, line, n) != n)
			_exit(3);
	}
}

/* ---- the agent side ---- */

static struct ctr *ctr_find(const char *name)
{
	for (int i = 0; i < MAX_CTRS; i++)
		if (ctrs[i].pid && !strcmp(ctrs[i].name, name))
			return &ctrs[i];
	return NULL;
}

/* Send one command to a container; returns its answer */
static long long ctr_ask(struct ctr *c, char op, long long arg)
{
	char line[64];
	ssize_t n;

	n = snprintf(line, sizeof(line), "%c %lld\n", op, arg);
	if (write(c->cmd, line, n) != n)
		return -EPIPE;
	n = read(c->reply, line, sizeof(line) - 1);
	if (n <= 0)
		return -EPIPE;
	line[n] = '\0';
	return strtoll(line, NULL, 10);
}

static void cmd_spawn(char *name, uint64_t id, size_t max_mib, int nothp)
{
	int to[2], from[2], slot = -1;
	pid_t pid;

	if (ctr_find(name))
		return reply_err(EEXIST, name);
	for (int i = 0; i < MAX_CTRS && slot < 0; i++)
		if (!ctrs[i].pid)
			slot = i;
	if (slot < 0 || strlen(name) >= sizeof(ctrs[0].name))
		return reply_err(ENOSPC, "container table");
	if (pipe(to) || pipe(from))
		return reply_err(errno, "pipe");
	fflush(stdout);
	pid = czt_clone_into(id);
	if (pid < 0) {
		int err = errno;

		close(to[0]); close(to[1]); close(from[0]); close(from[1]);
		return reply_err(err, "clone3");
	}
	if (pid == 0) {
		close(to[1]);
		close(from[0]);
		ctr_main(name, max_mib << 20, nothp, to[0], from[1]);
	}
	close(to[0]);
	close(from[1]);
	ctrs[slot] = (struct ctr){ .pid = pid, .cmd = to[1], .reply = from[0] };
	strcpy(ctrs[slot].name, name);
	reply("ok %d", pid);
}

static void cmd_ctr(char op, char *name, long long arg)
{
	struct ctr *c = ctr_find(name);
	long long res;

	if (!c)
		return reply_err(ENOENT, name);
	res = ctr_ask(c, op, arg);
	if (res <= -1000)
		return reply("err EIO %s page %lld corrupted", name, -res - 1000);
	if (res < 0)
		return reply_err(-res, name);
	reply("ok %lld", res);
}

static void cmd_interleave(long long step_kib, long long mib, char **names,
			   int n)
{
	struct ctr *c[MAX_CTRS];
	long long done, res;

	if (step_kib <= 0 || step_kib % 4 || n <= 0)
		return reply_err(EINVAL, "interleave");
	for (int i = 0; i < n; i++)
		if (!(c[i] = ctr_find(names[i])))
			return reply_err(ENOENT, names[i]);
	for (done = 0; done < mib << 10; done += step_kib)
		for (int i = 0; i < n; i++) {
			res = ctr_ask(c[i], 'T', step_kib);
			if (res < 0)
				return reply_err(-res, names[i]);
		}
	reply("ok");
}

static void cmd_kill(char *name)
{
	struct ctr *c = ctr_find(name);

	if (!c)
		return reply_err(ENOENT, name);
	kill(c->pid, SIGKILL);
	czt_wait(c->pid);
	close(c->cmd);
	close(c->reply);
	memset(c, 0, sizeof(*c));
	reply("ok");
}

static void cmd_czone(const char *op, uint64_t id)
{
	if (!strcmp(op, "destroy")) {
		struct czone_destroy d;
		int ret = czt_destroy(id, &d);

		if (ret)
			return reply_err(-ret, "CZONE_IOC_DESTROY");
		return reply("ok released=%llu migrated=%llu failed=%llu ns=%llu",
			     d.released_chunks, d.migrated_pages,
			     d.failed_pages, d.duration_ns);
	}
	if (!strcmp(op, "reclaim")) {
		struct czone_reclaim r = { .size = sizeof(r), .id = id };

		if (ioctl(czt_dev(), CZONE_IOC_RECLAIM, &r))
			return reply_err(errno, "CZONE_IOC_RECLAIM");
		return reply("ok released=%llu discarded=%llu failed=%llu ns=%llu",
			     r.released_chunks, r.discarded_pages,
			     r.failed_pages, r.duration_ns);
	}
	struct czone_stat st;
	int ret = czt_stat(id, &st);

	if (ret)
		return reply_err(-ret, "CZONE_IOC_STAT");
	reply("ok chunks=%llu used=%llu free=%llu backed=%llu tasks=%llu",
	      st.nr_chunks, st.used_pages, st.free_pages,
	      st.host_backed_pages, st.nr_tasks);
}

static int split(char *line, char **argv, int max)
{
	int n = 0;

	for (char *t = strtok(line, " \t\n"); t && n < max;
	     t = strtok(NULL, " \t\n"))
		argv[n++] = t;
	return n;
}

int main(void)
{
	char line[512], *argv[MAX_CTRS + 4];

	signal(SIGPIPE, SIG_IGN);
	reply("ready");
	while (fgets(line, sizeof(line), stdin)) {
		int argc = split(line, argv, MAX_CTRS + 4);
		const char *op = argc ? argv[0] : "";

		if (!strcmp(op, "quit")) {
			break;
		} else if (!strcmp(op, "create") && argc == 2) {
			uint64_t id;
			int ret = czt_create(strtoull(argv[1], NULL, 0) << 20, &id);

			if (ret)
				reply_err(-ret, "CZONE_IOC_CREATE");
			else
				reply("ok %llu", (unsigned long long)id);
		} else if (!strcmp(op, "spawn") && (argc == 4 || argc == 5)) {
			cmd_spawn(argv[1], strtoull(argv[2], NULL, 0),
				  strtoull(argv[3], NULL, 0),
				  argc == 5 && !strcmp(argv[4], "nothp"));
		} else if (!strcmp(op, "touch") && argc == 3) {
			cmd_ctr('T', argv[1], strtoll(argv[2], NULL, 0) << 10);
		} else if (!strcmp(op, "free") && argc == 3) {
			cmd_ctr('F', argv[1], strtoll(argv[2], NULL, 0) << 10);
		} else if (!strcmp(op, "punch") && argc == 3) {
			cmd_ctr('P', argv[1], strtoll(argv[2], NULL, 0));
		} else if (!strcmp(op, "verify") && argc == 2) {
			cmd_ctr('V', argv[1], 0);
		} else if (!strcmp(op, "interleave") && argc >= 4) {
			cmd_interleave(strtoll(argv[1], NULL, 0),
				       strtoll(argv[2], NULL, 0), argv + 3,
				       argc - 3);
		} else if (!strcmp(op, "kill") && argc == 2) {
			cmd_kill(argv[1]);
		} else if ((!strcmp(op, "destroy") || !strcmp(op, "reclaim") ||
			    !strcmp(op, "stat")) && argc == 2) {
			cmd_czone(op, strtoull(argv[1], NULL, 0));
		} else {
			reply_err(EINVAL, "unknown command or wrong arguments");
		}
	}
	for (int i = 0; i < MAX_CTRS; i++)
		if (ctrs[i].pid) {
			kill(ctrs[i].pid, SIGKILL);
			czt_wait(ctrs[i].pid);
		}
	return 0;
}
