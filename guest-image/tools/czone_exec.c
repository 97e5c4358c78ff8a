// SPDX-License-Identifier: GPL-2.0
/*
 * czone_exec: run a program in a CZone.
 *
 *   czone_exec ID PROG [ARG...]
 *
 * clone3(CLONE_INTO_CZONE) a child that execs PROG, so that PROG and every
 * task it forks allocate their user memory in CZone ID.  The parent stays
 * outside the CZone, forwards SIGTERM, SIGINT and SIGHUP to the child and
 * exits with the child's status (128 + signal if it was killed), so that the
 * caller can treat czone_exec as the program itself.  A failed clone3 or
 * exec exits 125 or 127 with one line on stderr.
 */
#include "czt.h"

static pid_t child;

static void forward(int sig)
{
	if (child > 0)
		kill(child, sig);
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = forward };
	unsigned long long id;
	char *end;
	int status;

	if (argc < 3) {
		fprintf(stderr, "usage: czone_exec ID PROG [ARG...]\n");
		return 125;
	}
	errno = 0;
	id = strtoull(argv[1], &end, 0);
	if (errno || *end || !id) {
		fprintf(stderr, "czone_exec: invalid CZone ID '%s'\n", argv[1]);
		return 125;
	}
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);

	child = czt_clone_into(id);
	if (child < 0) {
		fprintf(stderr, "czone_exec: clone3 into CZone %llu: %s\n", id,
			strerror(errno));
		return 125;
	}
	if (child == 0) {
		signal(SIGTERM, SIG_DFL);
		signal(SIGINT, SIG_DFL);
		signal(SIGHUP, SIG_DFL);
		execvp(argv[2], argv + 2);
		fprintf(stderr, "czone_exec: exec %s: %s\n", argv[2], strerror(errno));
		_exit(127);
	}
	while (waitpid(child, &status, 0) < 0)
		if (errno != EINTR)
			return 125;
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}
