// SPDX-License-Identifier: GPL-2.0
/*
 * czone_exec: run a program in a CZone.
 *
 *   czone_exec [--overlay LOWER BUNDLE SIZE] ID PROG [ARG...]
 *
 * clone3(CLONE_INTO_CZONE) a child that execs PROG, so that PROG and every
 * task it forks allocate their user memory in CZone ID; with ID 0, a plain
 * child in no CZone (the MCPV baselines' containers).  The parent stays
 * outside the CZone, forwards SIGTERM, SIGINT and SIGHUP to the child and
 * exits with the child's status (128 + signal if it was killed), so that the
 * caller can treat czone_exec as the program itself.  A failed clone3 or
 * exec exits 125 or 127 with one line on stderr.
 *
 * With --overlay, the child first makes a container's root: in a mount
 * namespace of its own, a tmpfs of SIZE at BUNDLE/layer for the overlay's
 * upper and work directories (its pages are the container's, so they land
 * in the CZone), and the overlay of it on LOWER at BUNDLE/rootfs.  Both
 * mounts end with the namespace, that is with the container.
 */
#include "czt.h"
#include <ctype.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/prctl.h>

static pid_t child;

static void forward(int sig)
{
	if (child > 0)
		kill(child, sig);
}

/* The container's root, in the child: 0, or exits 125 with one line */
static void make_root(const char *lower, const char *bundle, const char *size)
{
	char layer[512], upper[600], work[600], root[512], opts[2048];

	if (strlen(bundle) + strlen(lower) > 400) {
		errno = ENAMETOOLONG;
		goto fail;
	}
	snprintf(layer, sizeof(layer), "%s/layer", bundle);
	snprintf(upper, sizeof(upper), "%s/upper", layer);
	snprintf(work, sizeof(work), "%s/work", layer);
	snprintf(root, sizeof(root), "%s/rootfs", bundle);
	snprintf(opts, sizeof(opts), "size=%s,mode=0755", size);
	if (unshare(CLONE_NEWNS) ||
	    mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) ||
	    mount("czone-layer", layer, "tmpfs", 0, opts) ||
	    mkdir(upper, 0755) || mkdir(work, 0755))
		goto fail;
	snprintf(opts, sizeof(opts), "lowerdir=%s,upperdir=%s,workdir=%s",
		 lower, upper, work);
	if (mount("czone-root", root, "overlay", 0, opts))
		goto fail;
	return;
fail:
	fprintf(stderr, "czone_exec: container root in %s: %s\n", bundle,
		strerror(errno));
	_exit(125);
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = forward };
	const char *lower = NULL, *bundle = NULL, *size = NULL;
	unsigned long long id;
	sigset_t fwd;
	pid_t parent;
	char *end;
	int status;

	if (argc > 4 && !strcmp(argv[1], "--overlay")) {
		lower = argv[2];
		bundle = argv[3];
		size = argv[4];
		argv += 4;
		argc -= 4;
	}
	if (argc < 3) {
		fprintf(stderr,
			"usage: czone_exec [--overlay LOWER BUNDLE SIZE] ID PROG [ARG...]\n");
		return 125;
	}
	errno = 0;
	id = strtoull(argv[1], &end, 10);
	if (errno || *end || !isdigit((unsigned char)argv[1][0])) {
		fprintf(stderr, "czone_exec: invalid CZone ID '%s'\n", argv[1]);
		return 125;
	}
	/* Held until child is known, so that no signal is lost in between */
	sigemptyset(&fwd);
	sigaddset(&fwd, SIGTERM);
	sigaddset(&fwd, SIGINT);
	sigaddset(&fwd, SIGHUP);
	sigprocmask(SIG_BLOCK, &fwd, NULL);
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);

	parent = getpid();
	child = id ? czt_clone_into(id) : fork();
	if (child < 0) {
		fprintf(stderr, "czone_exec: clone3 into CZone %llu: %s\n", id,
			strerror(errno));
		return 125;
	}
	if (child == 0) {
		signal(SIGTERM, SIG_DFL);
		signal(SIGINT, SIG_DFL);
		signal(SIGHUP, SIG_DFL);
		sigprocmask(SIG_UNBLOCK, &fwd, NULL);
		/* If we are killed, so is the container's first task */
		if (prctl(PR_SET_PDEATHSIG, SIGKILL) || getppid() != parent)
			_exit(125);
		if (bundle)
			make_root(lower, bundle, size);
		execvp(argv[2], argv + 2);
		fprintf(stderr, "czone_exec: exec %s: %s\n", argv[2], strerror(errno));
		_exit(127);
	}
	sigprocmask(SIG_UNBLOCK, &fwd, NULL);
	while (waitpid(child, &status, 0) < 0)
		if (errno != EINTR)
			return 125;
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}
