/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Helpers shared by the CZone in-guest tests.
 *
 * Build: gcc -static -O2 -Wall -I<kernel headers_install>/include -o X X.c
 * Every test prints "PASS: ..." / "FAIL: ..." lines and exits non-zero
 * if anything failed.  Run as root in the guest.
 */
#ifndef CZT_H
#define CZT_H

#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/swap.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <linux/czone.h>
#include <linux/loop.h>

#ifndef CLONE_INTO_CZONE
#define CLONE_INTO_CZONE 0x400000000ULL
#endif
#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif

/* struct clone_args as of CLONE_ARGS_SIZE_VER3 (96 bytes) */
struct czt_clone_args {
	uint64_t flags;
	uint64_t pidfd;
	uint64_t child_tid;
	uint64_t parent_tid;
	uint64_t exit_signal;
	uint64_t stack;
	uint64_t stack_size;
	uint64_t tls;
	uint64_t set_tid;
	uint64_t set_tid_size;
	uint64_t cgroup;
	uint64_t czone;
};

static int czt_failures;

static inline void czt_result(int ok, const char *fmt, ...)
{
	va_list ap;

	printf("%s: ", ok ? "PASS" : "FAIL");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	if (!ok)
		czt_failures++;
}

/* @cond is evaluated before the message arguments */
#define CZT_CHECK(cond, ...)					\
	do {							\
		int czt_ok_ = !!(cond);				\
		czt_result(czt_ok_, __VA_ARGS__);		\
	} while (0)

static inline int czt_exit(void)
{
	printf("%s: %d failure(s)\n", czt_failures ? "FAILED" : "OK",
	       czt_failures);
	fflush(stdout);
	return czt_failures ? 1 : 0;
}

static inline pid_t czt_clone3(struct czt_clone_args *args, size_t size)
{
	return syscall(SYS_clone3, args, size);
}

/*
 * clone3() a child that shares our memory (CLONE_VM, CLONE_THREAD): it
 * starts on args->stack, writes one word there (a page fault in our mm)
 * and exits at once, never returning into C.  Returns its pid or -errno.
 */
static inline long czt_clone3_vm(struct czt_clone_args *args, size_t size)
{
	long ret;

	asm volatile("syscall\n\t"
		     "test %%rax, %%rax\n\t"
		     "jnz 1f\n\t"
		     "push %%rax\n\t"
		     "mov $60, %%eax\n\t"	/* exit(0): this thread only */
		     "xor %%edi, %%edi\n\t"
		     "syscall\n"
		     "1:"
		     : "=a"(ret)
		     : "0"((long)SYS_clone3), "D"(args), "S"(size)
		     : "rcx", "r11", "memory");
	return ret;
}

/* clone3() a child into CZone @id (0: no flag); returns pid, 0 in child */
static inline pid_t czt_clone_into(uint64_t id)
{
	struct czt_clone_args args;

	memset(&args, 0, sizeof(args));
	args.exit_signal = SIGCHLD;
	if (id) {
		args.flags = CLONE_INTO_CZONE;
		args.czone = id;
	}
	return czt_clone3(&args, sizeof(args));
}

static inline int czt_dev(void)
{
	static int fd = -1;

	if (fd < 0)
		fd = open("/dev/czone", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		perror("open /dev/czone");
		exit(2);
	}
	return fd;
}

static inline int czt_create(uint64_t cap, uint64_t *id)
{
	struct czone_create a = { .size = sizeof(a), .cap_bytes = cap };

	*id = 0;
	if (ioctl(czt_dev(), CZONE_IOC_CREATE, &a))
		return -errno;
	*id = a.id;
	return 0;
}

static inline int czt_destroy(uint64_t id, struct czone_destroy *out)
{
	struct czone_destroy a = { .size = sizeof(a), .id = id };

	if (out)
		memset(out, 0, sizeof(*out));
	if (ioctl(czt_dev(), CZONE_IOC_DESTROY, &a))
		return -errno;
	if (out)
		*out = a;
	return 0;
}

static inline int czt_stat(uint64_t id, struct czone_stat *st)
{
	memset(st, 0, sizeof(*st));
	st->size = sizeof(*st);
	st->id = id;
	if (ioctl(czt_dev(), CZONE_IOC_STAT, st))
		return -errno;
	return 0;
}

/* Milliseconds until CZone @id is gone (STAT says ENOENT), or -1 */
static inline long czt_gone_after(uint64_t id, long max_ms)
{
	struct czone_stat st;

	for (long ms = 0; ms <= max_ms; ms += 50) {
		if (czt_stat(id, &st) == -ENOENT)
			return ms;
		usleep(50000);
	}
	return -1;
}

/* Wait for @pid; returns its exit code, or 128 + signal */
static inline int czt_wait(pid_t pid)
{
	int status;

	if (waitpid(pid, &status, 0) != pid)
		return -1;
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return -1;
}

/* The CZone ID in /proc/<pid>/czone, or -1 */
static inline long long czt_proc_czone(pid_t pid)
{
	char path[64];
	long long id = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/%d/czone", pid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	if (fscanf(f, "%lld", &id) != 1)
		id = -1;
	fclose(f);
	return id;
}

struct czt_range {
	uint64_t start, end;	/* PFNs, end exclusive */
};

/* Read the chunk PFN ranges of CZone @id from debugfs */
static inline int czt_chunks(uint64_t id, struct czt_range *r, int max)
{
	char path[96], line[256];
	int n = 0;
	FILE *f;

	snprintf(path, sizeof(path), "/sys/kernel/debug/czone/%llu/chunks",
		 (unsigned long long)id);
	f = fopen(path, "r");
	if (!f)
		return -1;
	while (n < max && fgets(line, sizeof(line), f)) {
		unsigned long long s, e;

		if (sscanf(line, "%llx-%llx", &s, &e) == 2) {
			r[n].start = s;
			r[n].end = e;
			n++;
		}
	}
	fclose(f);
	return n;
}

static inline int czt_in_ranges(uint64_t pfn, const struct czt_range *r,
				int n)
{
	for (int i = 0; i < n; i++)
		if (pfn >= r[i].start && pfn < r[i].end)
			return 1;
	return 0;
}

/*
 * Check the resident pages of [addr, addr + len): how many are present,
 * how many lie inside @in and how many inside @out.
 */
static inline int czt_pfn_check(void *addr, size_t len,
				const struct czt_range *in, int nin,
				const struct czt_range *out, int nout,
				long *present, long *inside, long *outside)
{
	long psz = sysconf(_SC_PAGESIZE);
	uint64_t first = (uintptr_t)addr / psz;
	size_t n = len / psz;
	int fd = open("/proc/self/pagemap", O_RDONLY);

	*present = *inside = *outside = 0;
	if (fd < 0)
		return -1;
	for (size_t i = 0; i < n; i++) {
		uint64_t e, pfn;

		if (pread(fd, &e, 8, (first + i) * 8) != 8) {
			close(fd);
			return -1;
		}
		if (!(e & (1ULL << 63)))
			continue;
		pfn = e & ((1ULL << 55) - 1);
		(*present)++;
		if (czt_in_ranges(pfn, in, nin))
			(*inside)++;
		if (czt_in_ranges(pfn, out, nout))
			(*outside)++;
	}
	close(fd);
	return 0;
}

static inline void czt_touch(char *p, size_t len, int seed)
{
	for (size_t i = 0; i < len; i += 4096)
		p[i] = (char)(seed + i / 4096);
}

/* In a child: @len of anonymous memory, touched with @seed; exits 2 if none */
static inline char *czt_map_touched(size_t len, int seed)
{
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		_exit(2);
	czt_touch(p, len, seed);
	return p;
}

/*
 * Clone a task into CZone @id that touches @bytes of anonymous memory and
 * then waits until a byte is written to *@go.  Returns once the memory is
 * touched: the child's pid, or -1.
 */
static inline pid_t czt_holder(uint64_t id, size_t bytes, int seed, int *go)
{
	int g[2], ready[2];
	pid_t pid;
	char c;

	if (pipe(g) || pipe(ready))
		return -1;
	pid = czt_clone_into(id);
	if (pid == 0) {
		czt_map_touched(bytes, seed);
		write(ready[1], "r", 1);
		read(g[0], &c, 1);
		_exit(0);
	}
	close(g[0]);
	close(ready[1]);
	if (pid > 0)
		read(ready[0], &c, 1);
	close(ready[0]);
	*go = g[1];
	return pid;
}

/*
 * A cgroup2 group @path (under /sys/fs/cgroup, mounted if need be) with
 * the memory controller; returns an fd for CLONE_INTO_CGROUP, or -1.
 */
static inline int czt_cgroup(const char *path)
{
	int fd;

	mkdir("/sys/fs/cgroup", 0755);
	if (access("/sys/fs/cgroup/cgroup.controllers", F_OK))
		mount("cgroup2", "/sys/fs/cgroup", "cgroup2", 0, NULL);
	fd = open("/sys/fs/cgroup/cgroup.subtree_control", O_WRONLY);
	if (fd >= 0) {
		write(fd, "+memory", 7);
		close(fd);
	}
	mkdir(path, 0755);
	return open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
}

/* Write @s to the file @path: 0, or -errno */
static inline int czt_write(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC), ret = 0;

	if (fd < 0)
		return -errno;
	if (write(fd, s, strlen(s)) < 0)
		ret = -errno;
	close(fd);
	return ret;
}

/* The number after @key (e.g. "oom_kill ") in a "key value" file, or -1 */
static inline long czt_file_value(const char *path, const char *key)
{
	char line[256];
	size_t n = strlen(key);
	long v = -1;
	FILE *f = fopen(path, "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, key, n) && sscanf(line + n, "%ld", &v) == 1)
			break;
	fclose(f);
	return v;
}

/* Swap on a loop device over a file in $CZT_TMP (default /tmp), a tmpfs */
struct czt_swap {
	char loopdev[32];
	char file[256];
};

static inline int czt_swap_on(struct czt_swap *s, size_t bytes)
{
	const char *tmp = getenv("CZT_TMP") ? getenv("CZT_TMP") : "/tmp";
	static char page[4096];
	uint32_t *hdr = (uint32_t *)(page + 1024);
	int ctl, nr, fd, loop;

	snprintf(s->file, sizeof(s->file), "%s/czt-swap", tmp);
	fd = open(s->file, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return -1;
	/* a swap header: version 1, last page, no bad pages, the magic */
	memset(page, 0, sizeof(page));
	hdr[0] = 1;
	hdr[1] = bytes / sizeof(page) - 1;
	memcpy(page + sizeof(page) - 10, "SWAPSPACE2", 10);
	if (pwrite(fd, page, sizeof(page), 0) != sizeof(page))
		return -1;
	memset(page, 0, sizeof(page));
	for (size_t off = sizeof(page); off < bytes; off += sizeof(page))
		if (pwrite(fd, page, sizeof(page), off) != sizeof(page))
			return -1;
	ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
	nr = ctl < 0 ? -1 : ioctl(ctl, LOOP_CTL_GET_FREE);
	if (nr < 0)
		return -1;
	close(ctl);
	snprintf(s->loopdev, sizeof(s->loopdev), "/dev/loop%d", nr);
	loop = open(s->loopdev, O_RDWR | O_CLOEXEC);
	if (loop < 0 || ioctl(loop, LOOP_SET_FD, fd))
		return -1;
	close(loop);
	close(fd);
	return swapon(s->loopdev, 0);
}

static inline void czt_swap_off(const struct czt_swap *s)
{
	int loop;

	swapoff(s->loopdev);
	loop = open(s->loopdev, O_RDWR | O_CLOEXEC);
	if (loop >= 0) {
		ioctl(loop, LOOP_CLR_FD, 0);
		close(loop);
	}
	unlink(s->file);
}

#endif /* CZT_H */
