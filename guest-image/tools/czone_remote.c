// SPDX-License-Identifier: GPL-2.0
/*
 * czone_remote: a page belongs to the CZone of the mm it is mapped into,
 * whichever task faults it in (kernel patches 0037-0039).
 *
 * 1. A child in CZone A waits on regions it inherited untouched.  This
 *    process, in no CZone, faults pages into the child's mm with
 *    process_vm_writev() (anonymous and memfd), PTRACE_POKEDATA, a write
 *    to /proc/PID/mem and, as an outside userfaultfd monitor, UFFDIO_COPY
 *    (anonymous and shmem).  Every page lies in A's chunks and reads back.
 * 2. The same write into a child whose CZone is full fails with an error:
 *    nobody is killed and the CZone counts no OOM.
 * 3. A task of A with a page pinned by io_uring forks a child into CZone
 *    B: fork copies the pinned page for the child, into B.
 * 4. With swap on a loop device over a tmpfs file, the anonymous and
 *    memfd pages of a task in A, paged out with MADV_PAGEOUT, come back
 *    into A, with VMA readahead and with cluster readahead.
 *
 * Needs: /dev/czone, debugfs, CONFIG_USERFAULTFD, CONFIG_IO_URING,
 * CONFIG_SWAP, CONFIG_BLK_DEV_LOOP and a tmpfs at $CZT_TMP (default /tmp).
 */
#include "czt.h"
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <linux/io_uring.h>
#include <linux/userfaultfd.h>

#define MB		(1UL << 20)
#define PG		4096UL
#define NPAGES		16
#define LEN		(NPAGES * PG)
#define MAXR		1024
#define SWAP_BYTES	(64 * MB)
#define SWAP_PAGES	256

static struct czt_range ranges[MAXR];

/* Resident pages of @pid in [@addr, @addr + @len), and those in @id's chunks */
static int pid_placement(pid_t pid, uint64_t id, void *addr, size_t len,
			 long *present, long *inside)
{
	int n = czt_chunks(id, ranges, MAXR);
	char path[64];
	int fd;

	*present = *inside = 0;
	snprintf(path, sizeof(path), "/proc/%d/pagemap", pid);
	fd = open(path, O_RDONLY);
	if (n < 0 || fd < 0)
		return -1;
	for (size_t off = 0; off < len; off += PG) {
		uint64_t e;

		if (pread(fd, &e, 8, ((uintptr_t)addr + off) / PG * 8) != 8) {
			close(fd);
			return -1;
		}
		if (!(e & (1ULL << 63)))
			continue;
		(*present)++;
		if (czt_in_ranges(e & ((1ULL << 55) - 1), ranges, n))
			(*inside)++;
	}
	close(fd);
	return 0;
}

static void check_placed(const char *what, pid_t pid, uint64_t id, void *addr,
			 size_t len)
{
	long present, inside;

	if (pid_placement(pid, id, addr, len, &present, &inside)) {
		czt_result(0, "%s: cannot read chunks or pagemap", what);
		return;
	}
	CZT_CHECK(present == (long)(len / PG) && inside == present,
		  "%s: %ld of %lu pages resident, %ld in CZone %llu's chunks",
		  what, present, len / PG, inside, (unsigned long long)id);
}

static void fill(char *buf, size_t len, int seed)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = (char)(seed + i * 7 + i / PG);
}

/* The child's bytes at @addr equal fill(@seed), read without faulting */
static void check_data(const char *what, pid_t pid, void *addr, size_t len,
		       int seed)
{
	static char want[LEN], got[LEN];
	struct iovec l = { got, len }, r = { addr, len };

	fill(want, len, seed);
	CZT_CHECK(process_vm_readv(pid, &l, 1, &r, 1, 0) == (ssize_t)len &&
		  !memcmp(want, got, len), "%s: the child reads what was written",
		  what);
}

static int send_fd(int sock, int fd)
{
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 }, c = 'f';
	struct iovec iov = { &c, 1 };
	struct msghdr msg = {
		.msg_iov = &iov, .msg_iovlen = 1,
		.msg_control = cbuf, .msg_controllen = sizeof(cbuf),
	};
	struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);

	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &fd, sizeof(int));
	return sendmsg(sock, &msg, 0) == 1 ? 0 : -1;
}

static int recv_fd(int sock)
{
	char cbuf[CMSG_SPACE(sizeof(int))], c;
	struct iovec iov = { &c, 1 };
	struct msghdr msg = {
		.msg_iov = &iov, .msg_iovlen = 1,
		.msg_control = cbuf, .msg_controllen = sizeof(cbuf),
	};
	struct cmsghdr *cm;
	int fd;

	if (recvmsg(sock, &msg, 0) != 1)
		return -1;
	cm = CMSG_FIRSTHDR(&msg);
	if (!cm || cm->cmsg_type != SCM_RIGHTS)
		return -1;
	memcpy(&fd, CMSG_DATA(cm), sizeof(int));
	return fd;
}

static void *map_anon(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	return p == MAP_FAILED ? NULL : p;
}

static void *map_memfd(const char *name, size_t len, int *fdp)
{
	int fd = memfd_create(name, MFD_CLOEXEC);
	void *p;

	if (fd < 0 || ftruncate(fd, len))
		return NULL;
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		close(fd);
		return NULL;
	}
	*fdp = fd;
	return p;
}

/* ---- 1. another task faults pages into a CZone task's mm ---- */

static char *r_vmw, *r_vmw_shm, *r_poke, *r_mem, *r_uffd, *r_uffd_shm;

/* The child: register the uffd regions, hand the uffd over, then wait */
static int remote_child(int sock, int go)
{
	struct uffdio_api api = {
		.api = UFFD_API,
		.features = UFFD_FEATURE_MISSING_SHMEM,
	};
	struct uffdio_register reg = { .mode = UFFDIO_REGISTER_MODE_MISSING };
	int uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
	char c;

	reg.range.len = LEN;
	if (uffd >= 0 && !ioctl(uffd, UFFDIO_API, &api)) {
		reg.range.start = (uintptr_t)r_uffd;
		if (ioctl(uffd, UFFDIO_REGISTER, &reg))
			uffd = -1;
		reg.range.start = (uintptr_t)r_uffd_shm;
		if (uffd >= 0 && ioctl(uffd, UFFDIO_REGISTER, &reg))
			uffd = -1;
	} else {
		uffd = -1;
	}
	/* without a userfaultfd, a bare byte: the other cases still run */
	if (uffd >= 0 ? send_fd(sock, uffd) : write(sock, "n", 1) != 1)
		return 3;
	read(go, &c, 1);
	return 0;
}

static void poke(pid_t pid)
{
	static char want[LEN];
	int status, ok = 1;

	fill(want, LEN, 3);
	if (ptrace(PTRACE_SEIZE, pid, 0, 0) || ptrace(PTRACE_INTERRUPT, pid, 0, 0) ||
	    waitpid(pid, &status, 0) != pid || !WIFSTOPPED(status)) {
		czt_result(0, "ptrace: cannot stop the child: %s", strerror(errno));
		return;
	}
	for (size_t off = 0; off < LEN; off += PG) {
		long word;

		memcpy(&word, want + off, sizeof(word));
		ok &= !ptrace(PTRACE_POKEDATA, pid, r_poke + off, (void *)word);
		errno = 0;
		ok &= ptrace(PTRACE_PEEKDATA, pid, r_poke + off, 0) == word &&
		      !errno;
	}
	ptrace(PTRACE_DETACH, pid, 0, 0);
	CZT_CHECK(ok, "ptrace: PTRACE_POKEDATA into %lu pages, read back", NPAGES);
}

static void uffd_copy(const char *what, int uffd, char *dst, int seed)
{
	static char src[LEN];
	struct uffdio_copy copy = {
		.dst = (uintptr_t)dst, .src = (uintptr_t)src, .len = LEN,
	};

	fill(src, LEN, seed);
	CZT_CHECK(!ioctl(uffd, UFFDIO_COPY, &copy) && copy.copy == LEN,
		  "%s: UFFDIO_COPY of %lu pages by a monitor outside the CZone (copied %lld)",
		  what, NPAGES, (long long)copy.copy);
}

static void test_remote(void)
{
	static char buf[LEN];
	int sock[2], go[2], shm_fd = -1, ushm_fd = -1, uffd, memfd;
	struct iovec l = { buf, LEN }, r;
	uint64_t a;
	pid_t pid;

	r_vmw = map_anon(LEN);
	r_poke = map_anon(LEN);
	r_mem = map_anon(LEN);
	r_uffd = map_anon(LEN);
	r_vmw_shm = map_memfd("czt-vmw", LEN, &shm_fd);
	r_uffd_shm = map_memfd("czt-uffd", LEN, &ushm_fd);
	if (!r_vmw || !r_poke || !r_mem || !r_uffd || !r_vmw_shm ||
	    !r_uffd_shm || socketpair(AF_UNIX, SOCK_STREAM, 0, sock) ||
	    pipe(go) || czt_create(64 * MB, &a)) {
		czt_result(0, "remote: set-up failed: %s", strerror(errno));
		return;
	}

	pid = czt_clone_into(a);
	if (pid == 0)
		_exit(remote_child(sock[1], go[0]));
	/* a child that exits early must end recv_fd() */
	close(sock[1]);
	close(go[0]);
	uffd = recv_fd(sock[0]);
	if (pid < 0) {
		czt_result(0, "remote: no child: %s", strerror(errno));
		return;
	}
	CZT_CHECK(uffd >= 0, "userfaultfd: the child registered its regions");

	fill(buf, LEN, 1);
	r = (struct iovec){ r_vmw, LEN };
	CZT_CHECK(process_vm_writev(pid, &l, 1, &r, 1, 0) == LEN,
		  "process_vm_writev: %lu anonymous pages written", NPAGES);
	fill(buf, LEN, 2);
	r = (struct iovec){ r_vmw_shm, LEN };
	CZT_CHECK(process_vm_writev(pid, &l, 1, &r, 1, 0) == LEN,
		  "process_vm_writev: %lu memfd pages written", NPAGES);
	poke(pid);
	fill(buf, LEN, 4);
	{
		char path[64];

		snprintf(path, sizeof(path), "/proc/%d/mem", pid);
		memfd = open(path, O_RDWR);
		CZT_CHECK(memfd >= 0 &&
			  pwrite(memfd, buf, LEN, (uintptr_t)r_mem) == LEN,
			  "/proc/PID/mem: %lu pages written", NPAGES);
		if (memfd >= 0)
			close(memfd);
	}
	if (uffd >= 0) {
		uffd_copy("userfaultfd (anonymous)", uffd, r_uffd, 5);
		uffd_copy("userfaultfd (shmem)", uffd, r_uffd_shm, 6);
	}

	check_placed("process_vm_writev (anonymous)", pid, a, r_vmw, LEN);
	check_data("process_vm_writev (anonymous)", pid, r_vmw, LEN, 1);
	check_placed("process_vm_writev (memfd)", pid, a, r_vmw_shm, LEN);
	check_data("process_vm_writev (memfd)", pid, r_vmw_shm, LEN, 2);
	check_placed("PTRACE_POKEDATA", pid, a, r_poke, LEN);
	check_placed("/proc/PID/mem", pid, a, r_mem, LEN);
	check_data("/proc/PID/mem", pid, r_mem, LEN, 4);
	if (uffd >= 0) {
		check_placed("UFFDIO_COPY (anonymous)", pid, a, r_uffd, LEN);
		check_data("UFFDIO_COPY (anonymous)", pid, r_uffd, LEN, 5);
		check_placed("UFFDIO_COPY (shmem)", pid, a, r_uffd_shm, LEN);
		check_data("UFFDIO_COPY (shmem)", pid, r_uffd_shm, LEN, 6);
	}

	write(go[1], "g", 1);
	CZT_CHECK(czt_wait(pid) == 0, "remote: the child exits cleanly");
	if (uffd >= 0)
		close(uffd);
	munmap(r_vmw_shm, LEN);
	munmap(r_uffd_shm, LEN);
	close(shm_fd);
	close(ushm_fd);
	{
		struct czone_destroy d;

		CZT_CHECK(!czt_destroy(a, &d) && !d.failed_pages,
			  "remote: destroy A (migrated %llu, failed %llu)",
			  (unsigned long long)d.migrated_pages,
			  (unsigned long long)d.failed_pages);
	}
	close(sock[0]);
	close(go[1]);
}

/* ---- 2. a write into a full CZone fails; nobody is killed ---- */

static void test_remote_full(void)
{
	size_t big = 4 * MB;
	char *dst = map_anon(big), *buf = malloc(big);
	struct iovec l = { buf, big }, r = { dst, big };
	struct czone_stat st;
	ssize_t n;
	uint64_t f;
	int go;
	pid_t pid;

	if (!dst || !buf || czt_create(2 * MB, &f)) {
		czt_result(0, "full: set-up failed");
		return;
	}
	memset(buf, 0x5a, big);
	/* the holder's own pages and 1 MiB leave less than 1 MiB free */
	pid = czt_holder(f, MB, 9, &go);
	if (pid < 0) {
		czt_result(0, "full: no holder");
		return;
	}
	errno = 0;
	n = process_vm_writev(pid, &l, 1, &r, 1, 0);
	CZT_CHECK(n < (ssize_t)big && (n >= 0 || errno == ENOMEM ||
				      errno == EFAULT),
		  "full: process_vm_writev of 4 MiB into a 2 MiB CZone stops short (%zd, %s)",
		  n, n < 0 ? strerror(errno) : "partial");
	CZT_CHECK(!czt_stat(f, &st) && st.alloc_failures > 0 && !st.oom_kills,
		  "full: the CZone counts %llu failed allocations and %llu OOM invocations",
		  (unsigned long long)st.alloc_failures,
		  (unsigned long long)st.oom_kills);
	write(go, "g", 1);
	CZT_CHECK(czt_wait(pid) == 0,
		  "full: the holder was not killed and exits cleanly");
	close(go);
	CZT_CHECK(!czt_destroy(f, NULL), "full: destroy");
	munmap(dst, big);
	free(buf);
}

/* ---- 3. fork copies a pinned page into the child's CZone ---- */

static int pinned_parent(uint64_t b)
{
	struct io_uring_params params = { 0 };
	char *page = map_anon(PG);
	struct iovec iov = { page, PG };
	long present, inside;
	int ring;
	pid_t pid;

	if (!page)
		return 10;
	memset(page, 0x6b, PG);
	ring = syscall(__NR_io_uring_setup, 4, &params);
	if (ring < 0 ||
	    syscall(__NR_io_uring_register, ring, IORING_REGISTER_BUFFERS,
		    &iov, 1))
		return 11;
	pid = czt_clone_into(b);
	if (pid < 0)
		return 12;
	if (pid == 0) {
		int n = czt_chunks(b, ranges, MAXR);
		long outside;

		if (n < 0 || czt_pfn_check(page, PG, ranges, n, NULL, 0,
					   &present, &inside, &outside))
			_exit(13);
		_exit(present == 1 && inside == 1 && page[0] == 0x6b &&
		      page[PG - 1] == 0x6b ? 0 : 14);
	}
	return czt_wait(pid);
}

static void test_pinned_fork(void)
{
	uint64_t a, b;
	pid_t pid;
	int rc;

	if (czt_create(16 * MB, &a) || czt_create(16 * MB, &b)) {
		czt_result(0, "pinned fork: cannot create CZones");
		return;
	}
	pid = czt_clone_into(a);
	if (pid == 0)
		_exit(pinned_parent(b));
	rc = czt_wait(pid);
	CZT_CHECK(rc == 0,
		  "pinned fork: a child forked into B by a task of A gets its copy of an io_uring-pinned page in B's chunks (exit %d)",
		  rc);
	CZT_CHECK(!czt_destroy(a, NULL) && !czt_destroy(b, NULL),
		  "pinned fork: destroy A and B");
}

/* ---- 4. swapped-out pages come back into their CZone ---- */

static struct czt_swap swap;

static void set_vma_ra(int on)
{
	int fd = open("/sys/kernel/mm/swap/vma_ra_enabled", O_WRONLY);

	if (fd >= 0) {
		write(fd, on ? "true" : "false", on ? 4 : 5);
		close(fd);
	}
}

#define CGROUP "/sys/fs/cgroup/czt-swap"

/*
 * Page @p out until no page of it is resident.  MADV_PAGEOUT starts the
 * writeback and leaves the folios in the swap cache, where a read would
 * find them again; reclaim of the task's memory cgroup then frees them.
 */
static int page_out(char *p, size_t len)
{
	unsigned char vec[SWAP_PAGES];

	for (int i = 0; i < 200; i++) {
		int resident = 0, fd;

		madvise(p, len, MADV_PAGEOUT);
		fd = open(CGROUP "/memory.reclaim", O_WRONLY | O_CLOEXEC);
		if (fd >= 0) {
			write(fd, "8M", 2);
			close(fd);
		}
		if (mincore(p, len, vec))
			return -1;
		for (size_t j = 0; j < len / PG; j++)
			resident += vec[j] & 1;
		if (!resident)
			return 0;
		usleep(50000);
	}
	return -1;
}

static int swap_child(uint64_t a, const char *mode)
{
	size_t len = SWAP_PAGES * PG;
	char *anon = map_anon(len), *shm;
	long present, inside, outside;
	int fd, n, bad = 0;

	shm = map_memfd("czt-swap", len, &fd);
	if (!anon || !shm)
		return 20;
	for (size_t i = 0; i < len; i++) {
		anon[i] = (char)(i * 13 + i / PG);
		shm[i] = (char)(i * 11 + i / PG);
	}
	if (page_out(anon, len) || page_out(shm, len)) {
		printf("FAIL: %s: pages did not go out to swap\n", mode);
		return 21;
	}
	for (size_t i = 0; i < len; i++)
		bad += anon[i] != (char)(i * 13 + i / PG) ||
		       shm[i] != (char)(i * 11 + i / PG);
	n = czt_chunks(a, ranges, MAXR);
	czt_pfn_check(anon, len, ranges, n, NULL, 0, &present, &inside,
		      &outside);
	printf("%s: %s: anonymous: %ld of %d pages resident, %ld in A's chunks\n",
	       present == SWAP_PAGES && inside == present && !bad ? "PASS" : "FAIL",
	       mode, present, SWAP_PAGES, inside);
	if (present != SWAP_PAGES || inside != present || bad)
		return 22;
	czt_pfn_check(shm, len, ranges, n, NULL, 0, &present, &inside,
		      &outside);
	printf("%s: %s: memfd: %ld of %d pages resident, %ld in A's chunks\n",
	       present == SWAP_PAGES && inside == present ? "PASS" : "FAIL",
	       mode, present, SWAP_PAGES, inside);
	fflush(stdout);
	return present == SWAP_PAGES && inside == present ? 0 : 23;
}

static void test_swap(void)
{
	static const struct { int vma_ra; const char *mode; } modes[] = {
		{ 1, "swap-in with VMA readahead" },
		{ 0, "swap-in with cluster readahead" },
	};

	int cgfd = czt_cgroup(CGROUP);

	if (cgfd < 0 || czt_swap_on(&swap, SWAP_BYTES)) {
		czt_result(0, "swap: cannot set up a memory cgroup and swap on a loop device: %s",
			   strerror(errno));
		czt_swap_off(&swap);
		return;
	}
	for (int m = 0; m < 2; m++) {
		struct czt_clone_args args;
		uint64_t a;
		pid_t pid;
		int rc;

		set_vma_ra(modes[m].vma_ra);
		if (czt_create(64 * MB, &a)) {
			czt_result(0, "%s: cannot create a CZone", modes[m].mode);
			continue;
		}
		fflush(stdout);
		memset(&args, 0, sizeof(args));
		args.exit_signal = SIGCHLD;
		args.flags = CLONE_INTO_CZONE | CLONE_INTO_CGROUP;
		args.czone = a;
		args.cgroup = cgfd;
		pid = czt_clone3(&args, sizeof(args));
		if (pid == 0)
			_exit(swap_child(a, modes[m].mode));
		rc = czt_wait(pid);
		CZT_CHECK(rc == 0, "%s: the task's pages came back into A (exit %d)",
			  modes[m].mode, rc);
		CZT_CHECK(!czt_destroy(a, NULL), "%s: destroy", modes[m].mode);
	}
	set_vma_ra(1);
	czt_swap_off(&swap);
	close(cgfd);
	rmdir(CGROUP);
}

int main(void)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	test_remote();
	test_remote_full();
	test_pinned_fork();
	test_swap();
	return czt_exit();
}
