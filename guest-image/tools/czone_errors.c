// SPDX-License-Identifier: GPL-2.0
/*
 * Errors of clone3(CLONE_INTO_CZONE) and of the /dev/czone ioctls.
 */
#include "czt.h"

#define MB (1UL << 20)

/* clone3 with @args/@size; returns 0 if a child was made (and reaped) */
static int try_clone(struct czt_clone_args *args, size_t size)
{
	pid_t pid = czt_clone3(args, size);

	if (pid < 0)
		return -errno;
	if (pid == 0)
		_exit(0);
	czt_wait(pid);
	return 0;
}

static void clone_errors(uint64_t id, uint64_t dead)
{
	struct czt_clone_args a;
	size_t sizes[] = { 64, 80, 88, 96 };
	int ret;
	pid_t pid;

	for (unsigned int i = 0; i < 4; i++) {
		memset(&a, 0, sizeof(a));
		a.exit_signal = SIGCHLD;
		ret = try_clone(&a, sizes[i]);
		CZT_CHECK(ret == 0, "clone3 size %zu without CZone: %d",
			  sizes[i], ret);
	}

	memset(&a, 0, sizeof(a));
	a.exit_signal = SIGCHLD;
	a.flags = CLONE_INTO_CZONE;
	a.czone = id;
	ret = try_clone(&a, 96);
	CZT_CHECK(ret == 0, "clone3 into CZone %llu: %d",
		  (unsigned long long)id, ret);
	ret = try_clone(&a, 88);
	CZT_CHECK(ret == -EINVAL, "flag with size 88: %d (want EINVAL)", ret);

	a.czone = 0;
	ret = try_clone(&a, 96);
	CZT_CHECK(ret == -EINVAL, "flag with czone 0: %d (want EINVAL)", ret);

	a.czone = 999999;
	ret = try_clone(&a, 96);
	CZT_CHECK(ret == -ENOENT, "unknown id: %d (want ENOENT)", ret);
	a.czone = 1ULL << 40;
	ret = try_clone(&a, 96);
	CZT_CHECK(ret == -ENOENT, "huge id: %d (want ENOENT)", ret);
	a.czone = dead;
	ret = try_clone(&a, 96);
	CZT_CHECK(ret == -ENOENT, "destroyed id: %d (want ENOENT)", ret);

	a.flags = 0;
	a.czone = id;
	ret = try_clone(&a, 96);
	CZT_CHECK(ret == -EINVAL, "czone without flag: %d (want EINVAL)", ret);

	/* beyond VER3: trailing bytes must be zero */
	{
		char buf[104];

		memset(buf, 0, sizeof(buf));
		memset(&a, 0, sizeof(a));
		a.exit_signal = SIGCHLD;
		memcpy(buf, &a, sizeof(a));
		ret = try_clone((struct czt_clone_args *)buf, sizeof(buf));
		CZT_CHECK(ret == 0, "size 104, zero tail: %d", ret);
		buf[100] = 1;
		ret = try_clone((struct czt_clone_args *)buf, sizeof(buf));
		CZT_CHECK(ret == -E2BIG, "size 104, non-zero tail: %d (want E2BIG)",
			  ret);
	}

	/* without CAP_SYS_ADMIN */
	pid = fork();
	if (pid == 0) {
		if (setresuid(65534, 65534, 65534))
			_exit(3);
		memset(&a, 0, sizeof(a));
		a.exit_signal = SIGCHLD;
		a.flags = CLONE_INTO_CZONE;
		a.czone = id;
		ret = try_clone(&a, 96);
		if (ret != -EPERM)
			_exit(1);
		if (open("/dev/czone", O_RDWR) >= 0)
			_exit(2);
		_exit(0);
	}
	ret = czt_wait(pid);
	CZT_CHECK(ret == 0, "unprivileged: clone3 EPERM and /dev/czone closed (%d)",
		  ret);
}

#define STACK_SIZE (64UL << 10)

/* clone3(CLONE_INTO_CZONE @id) sharing our mm; reaps a child process */
static long clone_vm_into(uint64_t id, int thread, char *stack)
{
	struct czt_clone_args a;
	long ret;

	memset(&a, 0, sizeof(a));
	a.flags = CLONE_VM | CLONE_INTO_CZONE;
	if (thread)
		a.flags |= CLONE_SIGHAND | CLONE_THREAD;
	else
		a.exit_signal = SIGCHLD;
	a.stack = (uintptr_t)stack;
	a.stack_size = STACK_SIZE;
	a.czone = id;
	ret = czt_clone3_vm(&a, sizeof(a));
	if (ret > 0 && !thread)
		waitpid(ret, NULL, __WALL);
	return ret;
}

/* One mm lives in one CZone: a child sharing it may only join its own */
static void shared_mm_errors(uint64_t id, uint64_t other)
{
	char *stack = mmap(NULL, STACK_SIZE, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	long ret;
	pid_t pid;

	ret = clone_vm_into(id, 0, stack);
	CZT_CHECK(ret == -EINVAL, "CLONE_VM into a CZone from none: %ld (want EINVAL)", ret);
	ret = clone_vm_into(id, 1, stack);
	CZT_CHECK(ret == -EINVAL, "CLONE_THREAD into a CZone from none: %ld (want EINVAL)",
		  ret);

	pid = czt_clone_into(id);
	if (pid == 0) {
		int bad = 0;

		if (clone_vm_into(other, 0, stack) != -EINVAL)
			bad |= 1;
		if (clone_vm_into(other, 1, stack) != -EINVAL)
			bad |= 2;
		if (clone_vm_into(id, 0, stack) <= 0)
			bad |= 4;
		if (clone_vm_into(id, 1, stack) <= 0)	/* exit_group reaps it */
			bad |= 8;
		_exit(bad);
	}
	ret = czt_wait(pid);
	CZT_CHECK(ret == 0, "in a CZone: CLONE_VM and CLONE_THREAD into another EINVAL, into "
		  "its own OK (failed mask %ld)", ret);
	munmap(stack, STACK_SIZE);
}

/*
 * Without CAP_SYS_ADMIN the CZone's checks refuse, not file permissions:
 * with root's open descriptor, and as root of a new user namespace (the
 * device's owner, with no capability in the initial namespace).
 */
static void privilege_errors(uint64_t id)
{
	struct czone_create c = { .size = sizeof(c), .cap_bytes = 2 * MB };
	struct czone_stat st = { .size = sizeof(st), .id = id };
	int fd = czt_dev();
	pid_t pid;
	int ret;

	pid = fork();
	if (pid == 0) {
		if (setresuid(65534, 65534, 65534))
			_exit(10);
		if (ioctl(fd, CZONE_IOC_CREATE, &c) == 0 || errno != EPERM)
			_exit(1);
		if (ioctl(fd, CZONE_IOC_STAT, &st) == 0 || errno != EPERM)
			_exit(2);
		_exit(0);
	}
	ret = czt_wait(pid);
	CZT_CHECK(ret == 0, "unprivileged with root's descriptor: ioctls EPERM (%d)", ret);

	pid = fork();
	if (pid == 0) {
		struct czt_clone_args a;

		if (unshare(CLONE_NEWUSER))
			_exit(10);
		if (open("/dev/czone", O_RDWR) >= 0 || errno != EPERM)
			_exit(1);
		if (ioctl(fd, CZONE_IOC_CREATE, &c) == 0 || errno != EPERM)
			_exit(2);
		memset(&a, 0, sizeof(a));
		a.exit_signal = SIGCHLD;
		a.flags = CLONE_INTO_CZONE;
		a.czone = id;
		if (try_clone(&a, sizeof(a)) != -EPERM)
			_exit(3);
		_exit(0);
	}
	ret = czt_wait(pid);
	CZT_CHECK(ret == 0, "root of a user namespace: open, ioctl and clone3 EPERM (%d)", ret);
}

static int ioc(unsigned long cmd, void *arg)
{
	return ioctl(czt_dev(), cmd, arg) ? -errno : 0;
}

static void ioctl_errors(uint64_t id)
{
	struct czone_create c;
	struct czone_grow g;
	struct czone_stat st = { 0 };
	struct czone_list l;
	uint64_t ids[2];
	char big[64];
	int ret;

#define CREATE(cap) do { memset(&c, 0, sizeof(c)); c.size = sizeof(c); \
		c.cap_bytes = (cap); } while (0)
	CREATE(0);
	CZT_CHECK(ioc(CZONE_IOC_CREATE, &c) == -EINVAL, "create cap 0: EINVAL");
	CREATE(3 * MB);
	CZT_CHECK(ioc(CZONE_IOC_CREATE, &c) == -EINVAL, "create misaligned cap: EINVAL");
	CREATE(1ULL << 41);
	CZT_CHECK(ioc(CZONE_IOC_CREATE, &c) == -EINVAL, "create 2 TiB cap: EINVAL");
	CREATE(~0ULL - 1);
	CZT_CHECK(ioc(CZONE_IOC_CREATE, &c) == -EINVAL, "create ~0 cap: EINVAL");
	CREATE(2 * MB);
	c.flags = 1;
	CZT_CHECK(ioc(CZONE_IOC_CREATE, &c) == -EINVAL, "create flags: EINVAL");
	CREATE(2 * MB);
	c.size = 4;
	CZT_CHECK(ioc(CZONE_IOC_CREATE, &c) == -EINVAL, "create size 4: EINVAL");
	c.size = 28;
	CZT_CHECK(ioc(CZONE_IOC_CREATE, &c) == -EINVAL, "create size 28: EINVAL");
	c.size = 8192;
	CZT_CHECK(ioc(CZONE_IOC_CREATE, &c) == -EINVAL, "create size 8192: EINVAL");
	CZT_CHECK(ioc(CZONE_IOC_CREATE, NULL) == -EFAULT, "create NULL: EFAULT");
	CZT_CHECK(ioc(CZONE_IOC_CREATE, (void *)1) == -EFAULT, "create bad pointer: EFAULT");

	memset(big, 0, sizeof(big));
	memcpy(big, &c, sizeof(c));
	((struct czone_create *)big)->size = 32;
	big[30] = 1;
	CZT_CHECK(ioc(CZONE_IOC_CREATE, big) == -E2BIG, "create size 32 non-zero tail: E2BIG");
	big[30] = 0;
	ret = ioc(CZONE_IOC_CREATE, big);
	CZT_CHECK(ret == 0, "create size 32 zero tail: %d", ret);
	if (!ret)
		czt_destroy(((struct czone_create *)big)->id, NULL);

	memset(&g, 0, sizeof(g));
	g.size = sizeof(g);
	g.id = id;
	g.bytes = 2 * MB;
	CZT_CHECK(ioc(CZONE_IOC_GROW, &g) == 0, "grow by 2 MiB");
	g.bytes = 1;
	CZT_CHECK(ioc(CZONE_IOC_GROW, &g) == -EINVAL, "grow misaligned: EINVAL");
	g.bytes = 1ULL << 40;
	CZT_CHECK(ioc(CZONE_IOC_GROW, &g) == -EINVAL, "grow past 1 TiB: EINVAL");
	g.bytes = 2 * MB;
	g.id = 424242;
	CZT_CHECK(ioc(CZONE_IOC_GROW, &g) == -ENOENT, "grow unknown: ENOENT");

	CZT_CHECK(czt_stat(id, &st) == 0 && st.cap_bytes == 6 * MB &&
		  st.chunk_bytes == 2 * MB && st.page_size == 4096,
		  "stat: cap=%llu chunk=%llu", st.cap_bytes, st.chunk_bytes);
	CZT_CHECK(czt_stat(0, &st) == -ENOENT, "stat id 0: ENOENT");
	CZT_CHECK(czt_stat(~0ULL, &st) == -ENOENT, "stat id ~0: ENOENT");
	CZT_CHECK(czt_destroy(777777, NULL) == -ENOENT, "destroy unknown: ENOENT");

	memset(&l, 0, sizeof(l));
	l.size = sizeof(l);
	ret = ioc(CZONE_IOC_LIST, &l);
	CZT_CHECK(ret == -E2BIG && l.count >= 1, "list count 0: E2BIG, count=%u",
		  l.count);
	l.count = 2;
	l.ids = (uintptr_t)ids;
	ids[0] = 0;
	ret = ioc(CZONE_IOC_LIST, &l);
	CZT_CHECK(ret == 0 && l.count == 1 && ids[0] == id,
		  "list: %d count=%u id=%llu", ret, l.count,
		  (unsigned long long)ids[0]);
	l.count = 2;
	l.ids = 8;
	CZT_CHECK(ioc(CZONE_IOC_LIST, &l) == -EFAULT, "list bad buffer: EFAULT");
	l.count = CZONE_LIST_MAX + 1;
	CZT_CHECK(ioc(CZONE_IOC_LIST, &l) == -EINVAL, "list huge count: EINVAL");

	CZT_CHECK(ioc(_IO(CZONE_IOC_MAGIC, 0x7f), &l) == -ENOTTY, "unknown ioctl: ENOTTY");
	/* the whole number, not just _IOC_NR, names an ioctl */
	CREATE(2 * MB);
	CZT_CHECK(ioc(_IO(CZONE_IOC_MAGIC, _IOC_NR(CZONE_IOC_CREATE)), &c) == -ENOTTY,
		  "create without direction and size: ENOTTY");
	CZT_CHECK(ioc(_IOWR(CZONE_IOC_MAGIC, _IOC_NR(CZONE_IOC_CREATE), uint64_t), &c) ==
		  -ENOTTY, "create with another size: ENOTTY");
	CZT_CHECK(ioc(_IOR(CZONE_IOC_MAGIC, _IOC_NR(CZONE_IOC_STAT), struct czone_stat),
		      &st) == -ENOTTY, "stat with another direction: ENOTTY");
	CZT_CHECK(ioc(_IO('x', 1), &l) == -ENOTTY, "foreign ioctl: ENOTTY");
}

int main(void)
{
	uint64_t id, dead, other;

	if (czt_create(4 * MB, &id) || czt_create(2 * MB, &dead) ||
	    czt_destroy(dead, NULL)) {
		czt_result(0, "setup: %s", strerror(errno));
		return czt_exit();
	}
	clone_errors(id, dead);
	ioctl_errors(id);
	privilege_errors(id);
	if (czt_create(2 * MB, &other) == 0) {
		shared_mm_errors(id, other);
		CZT_CHECK(czt_destroy(other, NULL) == 0, "destroy the other CZone");
	} else {
		czt_result(0, "create the other CZone: %s", strerror(errno));
	}
	CZT_CHECK(czt_destroy(id, NULL) == 0, "cleanup destroy");
	return czt_exit();
}
