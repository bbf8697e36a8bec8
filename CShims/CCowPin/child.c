/*
 * Children after fork(). The parent may be multi-threaded (the test runner
 * uses a thread pool), so the child runs only async-signal-safe code: this
 * interpreter and raw syscalls. The program and the status block are set up
 * by the parent before fork(); nothing here allocates or takes a lock.
 */
#include "cowpin_shim.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void child_reset_signals(void)
{
    static const int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGUSR1, SIGUSR2, SIGALRM, SIGCHLD,
                                SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGTRAP, SIGSYS};
    struct sigaction dfl;
    memset(&dfl, 0, sizeof(dfl));
    dfl.sa_handler = SIG_DFL;
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
        sigaction(sigs[i], &dfl, NULL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

int cp_report_matches(const struct cp_report *r, const void *view)
{
    if (r->count == 0 || r->count > CP_MAX_STRETCHES)
        return 0;
    const uint8_t *v = view;
    for (uint32_t i = 0; i < r->count; i++) {
        const struct cp_stretch *s = &r->stretch[i];
        if (s->offset < r->offset || s->length > r->length || s->offset - r->offset > r->length - s->length)
            return 0;
        const uint8_t *p = v + (s->offset - r->offset);
        int ok;
        switch (s->kind) {
        case CP_CONTENT_FILL:
            ok = cp_all_equal(p, s->length, (uint8_t)s->value);
            break;
        case CP_CONTENT_PATTERN:
            ok = cp_matches_pattern(p, s->length, s->value, s->offset);
            break;
        default:
            ok = 0;
        }
        if (!ok)
            return 0;
    }
    return 1;
}

uint32_t cp_report_status(const struct cp_report *r) { return __atomic_load_n(&r->status, __ATOMIC_ACQUIRE); }

/* CP_OP_VERIFY: check the view in place; copy it out only when it differs. */
static int64_t child_verify(const void *view, struct cp_report *r, uint64_t len)
{
    if (len != r->length)
        return -EINVAL;
    uint32_t status = CP_REPORT_MATCHES;
    if (!cp_report_matches(r, view)) {
        if (r->copy_to != view) {
            /* fork() does not copy the page table of a shared mapping:
             * populate the report buffer in one call instead of faulting
             * per page (best effort: MADV_POPULATE_WRITE is 5.14+, and
             * needs a page-aligned start). */
            madvise(r->copy_to, len, MADV_POPULATE_WRITE);
            memcpy(r->copy_to, view, len);
        }
        status = CP_REPORT_COPIED;
    }
    __atomic_store_n(&r->status, status, __ATOMIC_RELEASE);
    return status;
}

/* Runs one operation; returns its result (>= 0) or -errno. */
static int64_t child_op(const struct cp_op *op)
{
    switch (op->kind) {
    case CP_OP_SIGNAL:
        return cp_signal(op->fd);
    case CP_OP_AWAIT:
        return cp_await(op->fd, (int)op->arg);
    case CP_OP_FILL:
        memset(op->addr, (int)op->arg, op->len);
        return 0;
    case CP_OP_VERIFY:
        return child_verify(op->addr, op->addr2, op->len);
    case CP_OP_MUNMAP:
        return munmap(op->addr, op->len) ? -errno : 0;
    case CP_OP_MPROTECT:
        return mprotect(op->addr, op->len, (int)op->arg) ? -errno : 0;
    case CP_OP_VMSPLICE:
        return cp_vmsplice(op->fd, op->addr, op->len);
    case CP_OP_READ: {
        ssize_t r = cp_read_full(op->fd, op->addr2, op->len, (int)op->arg);
        return r >= 0 && (uint64_t)r < op->len ? -ENODATA : r;
    }
    default:
        return -EINVAL;
    }
}

static void __attribute__((noreturn)) child_main(const struct cp_op *ops, size_t n,
                                                 struct cp_child_status *st, pid_t parent)
{
    /* Die with the forking thread; never outlive a killed harness. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(CP_CHILD_BAD_PROGRAM);
    child_reset_signals();
    if (n > CP_MAX_OPS)
        _exit(CP_CHILD_BAD_PROGRAM);
    for (size_t i = 0; i < n; i++) {
        if (ops[i].kind == CP_OP_END)
            break;
        int64_t r = child_op(&ops[i]);
        st->result[i] = r;
        if (r < 0) {
            st->failed_op = (int32_t)i;
            st->failed_errno = (int32_t)-r;
            _exit(CP_CHILD_OP_FAILED);
        }
        st->done = (int32_t)(i + 1);
    }
    _exit(CP_CHILD_OK);
}

int cp_spawn(const struct cp_op *ops, size_t n, struct cp_child_status *status,
             pid_t *pid_out, int *pidfd_out)
{
    if (n > CP_MAX_OPS)
        return -E2BIG;
    memset(status, 0, sizeof(*status));
    status->failed_op = -1;
    pid_t parent = getpid();
    /* _Fork: no atfork handlers, async-signal-safe in the child. */
    pid_t pid = _Fork();
    if (pid < 0)
        return -errno;
    if (pid == 0)
        child_main(ops, n, status, parent);
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0) {
        int err = errno;
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        return -err;
    }
    *pid_out = pid;
    *pidfd_out = pidfd;
    return 0;
}

/* A pidfd is readable once the process has exited. */
static int wait_pidfd(int pidfd, int timeout_ms) { return cp_wait_readable(pidfd, timeout_ms); }

static int reap_now(pid_t pid, int *wstatus)
{
    for (;;) {
        pid_t r = waitpid(pid, wstatus, 0);
        if (r == pid)
            return 0;
        if (r < 0 && errno == EINTR)
            continue;
        return r < 0 ? -errno : -ECHILD;
    }
}

int cp_reap(pid_t pid, int pidfd, int timeout_ms, int *wstatus)
{
    int r = wait_pidfd(pidfd, timeout_ms);
    if (r == -ETIMEDOUT) {
        kill(pid, SIGKILL);
        /* A child stuck in the kernel may not die at once; stay bounded. */
        if (wait_pidfd(pidfd, 10000) == 0)
            reap_now(pid, wstatus);
        close(pidfd);
        return -ETIMEDOUT;
    }
    int rr = reap_now(pid, wstatus);
    close(pidfd);
    return r ? r : rr;
}

void cp_kill_reap(pid_t pid, int pidfd)
{
    int st;
    kill(pid, SIGKILL);
    if (wait_pidfd(pidfd, 10000) == 0)
        reap_now(pid, &st);
    close(pidfd);
}

int cp_wexitstatus(int s) { return WEXITSTATUS(s); }
int cp_wifsignaled(int s) { return WIFSIGNALED(s); }
int cp_wtermsig(int s) { return WTERMSIG(s); }
