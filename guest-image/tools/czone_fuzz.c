// SPDX-License-Identifier: GPL-2.0
/*
 * Random clone3() and /dev/czone ioctl arguments.  The kernel must answer
 * each with a result or an errno; the caller checks dmesg afterwards for
 * oopses, BUGs and WARNs.
 *
 * Usage: czone_fuzz [iterations (10000)] [seed]
 */
#include "czt.h"

#define MB (1ULL << 20)

static uint64_t rng_state = 88172645463325252ULL;

static uint64_t rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static uint64_t ids[64];
static unsigned int nids;

static uint64_t pick_id(void)
{
	switch (rnd() % 6) {
	case 0:
		return 0;
	case 1:
		return rnd();
	case 2:
		return rnd() % 100;
	default:
		return nids ? ids[rnd() % nids] : 1;
	}
}

static size_t pick_size(void)
{
	static const size_t s[] = { 0, 4, 8, 16, 24, 28, 32, 48, 56, 64, 72,
				    80, 88, 96, 104, 112, 128, 4096, 4097,
				    8192 };

	if (rnd() % 8 == 0)
		return rnd() % 300;
	return s[rnd() % (sizeof(s) / sizeof(s[0]))];
}

/* clone flags that would make the child unsafe for this harness */
#define UNSAFE (0x00000100ULL /* VM */ | 0x00000800ULL /* SIGHAND */ |	\
		0x00001000ULL /* PIDFD */ | 0x00002000ULL /* PTRACE */ |	\
		0x00004000ULL /* VFORK */ | 0x00008000ULL /* PARENT */ |	\
		0x00010000ULL /* THREAD */ | 0x00080000ULL /* SETTLS */ |	\
		0x00100000ULL /* PARENT_SETTID */ |			\
		0x00200000ULL /* CHILD_CLEARTID */ |			\
		0x01000000ULL /* CHILD_SETTID */ |			\
		0x10000000ULL /* NEWUSER */ | 0x20000000ULL /* NEWPID */ |	\
		0x40000000ULL /* NEWNET */ | 0x00000080ULL /* NEWTIME */ |	\
		0x02000000ULL /* NEWCGROUP */ | 0x00020000ULL /* NEWNS */)

static unsigned long clone_ok, clone_err, vm_ok, vm_err;

#define CHILD_BYTES (64 << 10)
#define VM_STACK (64UL << 10)

/* a fuzzed child allocates before it exits */
static void child(void)
{
	char *p = mmap(NULL, CHILD_BYTES, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p != MAP_FAILED)
		memset(p, 0x5a, CHILD_BYTES);
	_exit(0);
}

/*
 * A child sharing our mm (CLONE_VM, maybe CLONE_THREAD), into a random
 * CZone: it faults one page of its stack, in our mm, and exits
 * (czt_clone3_vm).  One stack serves them all: each writes one word.
 */
static void fuzz_clone_vm(void)
{
	static char *stack;
	struct czt_clone_args a;
	long ret;

	if (!stack)
		stack = mmap(NULL, VM_STACK, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memset(&a, 0, sizeof(a));
	a.flags = CLONE_VM;
	if (rnd() % 2)
		a.flags |= CLONE_SIGHAND | CLONE_THREAD;
	else
		a.exit_signal = SIGCHLD;
	if (rnd() % 4)
		a.flags |= CLONE_INTO_CZONE;
	if (rnd() % 4)
		a.czone = pick_id();
	a.stack = (uintptr_t)stack;
	a.stack_size = VM_STACK;
	ret = czt_clone3_vm(&a, rnd() % 4 ? sizeof(a) : pick_size());
	if (ret > 0) {
		vm_ok++;
		if (!(a.flags & CLONE_THREAD))
			waitpid(ret, NULL, __WALL);
	} else {
		vm_err++;
	}
}

static void fuzz_clone(void)
{
	unsigned char buf[8200];
	struct czt_clone_args *a = (void *)buf;
	size_t size = pick_size();
	pid_t pid;

	memset(buf, 0, sizeof(buf));
	a->flags = 0;
	if (rnd() % 2)
		a->flags |= CLONE_INTO_CZONE;
	if (rnd() % 4 == 0)
		a->flags |= rnd() & ~UNSAFE;
	if (rnd() % 8 == 0)
		a->flags |= CLONE_INTO_CGROUP;
	a->flags &= ~UNSAFE;
	a->exit_signal = SIGCHLD;
	if (rnd() % 16 == 0)
		a->exit_signal = rnd() % 80;
	/*
	 * glibc's internal signals cannot be ignored; SIGKILL or a stop
	 * signal would kill or stop the harness
	 */
	if (a->exit_signal == 32 || a->exit_signal == 33 ||
	    a->exit_signal == SIGKILL || a->exit_signal == SIGSTOP ||
	    a->exit_signal == SIGTSTP ||
	    a->exit_signal == SIGTTIN || a->exit_signal == SIGTTOU)
		a->exit_signal = SIGCHLD;
	if (rnd() % 16 == 0)
		a->cgroup = rnd() % 8;
	if (rnd() % 8 == 0) {
		a->stack = rnd();
		a->stack_size = rnd() % 3 ? 0 : rnd();
	}
	if (rnd() % 2)
		a->czone = pick_id();
	if (rnd() % 8 == 0)
		buf[96 + rnd() % 64] = (unsigned char)rnd();
	/* never hand the kernel a stack for a child that shares nothing */
	if (a->stack || a->stack_size) {
		a->stack = 0;
		a->stack_size = 0;
	}

	pid = czt_clone3(a, size);
	if (pid == 0)
		child();
	if (pid > 0) {
		clone_ok++;
		waitpid(pid, NULL, __WALL);
	} else {
		clone_err++;
	}
}

static unsigned long ioc_ok, ioc_err;

static void fuzz_ioctl(int fd)
{
	static const unsigned long cmds[] = {
		CZONE_IOC_CREATE, CZONE_IOC_DESTROY, CZONE_IOC_GROW,
		CZONE_IOC_STAT, CZONE_IOC_LIST, CZONE_IOC_RECLAIM,
	};
	uint64_t buf[1100];
	unsigned char *b = (unsigned char *)buf;
	unsigned long cmd;
	void *arg = buf;
	size_t size = pick_size();

	static const size_t sizes[] = {
		sizeof(struct czone_create), sizeof(struct czone_destroy),
		sizeof(struct czone_grow), sizeof(struct czone_stat),
		sizeof(struct czone_list), sizeof(struct czone_reclaim),
	};
	unsigned int which = rnd() % 6;

	memset(buf, 0, sizeof(buf));
	cmd = cmds[which];
	/* half of the calls get the right size, to reach the handlers */
	if (rnd() % 2)
		size = sizes[which];
	if (rnd() % 16 == 0)
		cmd = _IOC(rnd() % 4, CZONE_IOC_MAGIC, rnd() % 16, rnd() % 256);
	if (rnd() % 32 == 0)
		cmd = rnd();

	*(uint32_t *)b = size;
	if (rnd() % 4 == 0)
		*(uint32_t *)(b + 4) = rnd();		/* flags / count */
	switch (rnd() % 4) {
	case 0:
		buf[1] = pick_id();
		break;
	case 1:
		buf[1] = rnd() % 4 ? (rnd() % 64) * 2 * MB : rnd();
		break;
	default:
		buf[1] = pick_id();
		buf[2] = rnd() % 2 ? (rnd() % 32) * 2 * MB : rnd();
	}
	/* list: count in b+4 and user buffer in buf[1] */
	if (_IOC_NR(cmd) == _IOC_NR(CZONE_IOC_LIST) && rnd() % 2) {
		*(uint32_t *)(b + 4) = rnd() % 70000;
		buf[1] = rnd() % 2 ? (uintptr_t)&buf[16] : rnd();
		if (*(uint32_t *)(b + 4) > 1000 && buf[1] == (uintptr_t)&buf[16])
			*(uint32_t *)(b + 4) = 1000;
	}
	if (rnd() % 4 == 0)
		for (int i = 3; i < 16; i++)
			buf[i] = rnd() % 3 ? 0 : rnd();
	switch (rnd() % 16) {
	case 0:
		arg = NULL;
		break;
	case 1:
		arg = (void *)(uintptr_t)rnd();
		break;
	case 2:
		arg = (char *)buf + sizeof(buf) - 4;	/* straddles the end */
		break;
	}

	if (ioctl(fd, cmd, arg) == 0) {
		ioc_ok++;
		if (cmd == CZONE_IOC_CREATE && arg == buf && nids < 64)
			ids[nids++] = buf[2];
	} else {
		ioc_err++;
	}
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 10000;
	int fd = czt_dev();
	struct czone_list l = { .size = sizeof(l) };
	static uint64_t all[CZONE_LIST_MAX];
	uint64_t id;

	if (argc > 2)
		rng_state = strtoull(argv[2], NULL, 0) | 1;
	/* random exit_signal values must not kill the harness */
	for (int sig = 1; sig < 65; sig++)
		if (sig != SIGKILL && sig != SIGSTOP && sig != SIGCHLD)
			signal(sig, SIG_IGN);
	for (int i = 0; i < 4; i++)
		if (!czt_create(((i % 3) + 1) * 2 * MB, &id))
			ids[nids++] = id;

	for (long i = 0; i < n; i++) {
		uint64_t r = rnd() % 16;

		if (r < 2)
			fuzz_clone_vm();
		else if (r < 9)
			fuzz_clone();
		else
			fuzz_ioctl(fd);
	}

	/* clean up every CZone left */
	l.count = CZONE_LIST_MAX;
	l.ids = (uintptr_t)all;
	if (ioctl(fd, CZONE_IOC_LIST, &l) == 0)
		for (unsigned int i = 0; i < l.count; i++)
			czt_destroy(all[i], NULL);
	l.count = 0;
	l.ids = 0;
	CZT_CHECK(ioctl(fd, CZONE_IOC_LIST, &l) == 0 && l.count == 0,
		  "all CZones destroyed (%u left)", l.count);
	czt_result(1, "%ld iterations: clone3 %lu ok / %lu errors, sharing the mm %lu ok / "
		   "%lu errors, ioctl %lu ok / %lu errors",
		   n, clone_ok, clone_err, vm_ok, vm_err, ioc_ok, ioc_err);
	return czt_exit();
}
