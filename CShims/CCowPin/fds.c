/* Pipes and descriptors: bounded waits, full reads and writes, vmsplice.
 * Async-signal-safe (the child's checkpoints and reads use them). */
#include "cowpin_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

int cp_pipe(int fds[2]) { return pipe2(fds, O_CLOEXEC) ? -errno : 0; }

int cp_set_pipe_size(int fd, int size)
{
    int r = fcntl(fd, F_SETPIPE_SZ, size);
    return r < 0 ? -errno : r;
}

int cp_close(int fd) { return close(fd) ? -errno : 0; }

int cp_signal(int fd)
{
    char c = 'x';
    for (;;) {
        ssize_t r = write(fd, &c, 1);
        if (r == 1)
            return 0;
        if (r < 0 && errno == EINTR)
            continue;
        return r < 0 ? -errno : -EIO;
    }
}

/* poll() for POLLIN, at most timeout_ms in total, retrying on EINTR. */
int cp_wait_readable(int fd, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        long left = timeout_ms - elapsed;
        if (left < 0)
            left = 0;
        int r = poll(&p, 1, (int)left);
        if (r > 0)
            return 0;
        if (r == 0)
            return -ETIMEDOUT;
        if (errno != EINTR)
            return -errno;
    }
}

int cp_await(int fd, int timeout_ms)
{
    uint8_t c;
    return cp_await_value(fd, timeout_ms, &c);
}

int cp_await_value(int fd, int timeout_ms, uint8_t *value)
{
    int r = cp_wait_readable(fd, timeout_ms);
    if (r)
        return r;
    for (;;) {
        ssize_t n = read(fd, value, 1);
        if (n == 1)
            return 0;
        if (n == 0)
            return -EPIPE;
        if (errno != EINTR)
            return -errno;
    }
}

ssize_t cp_read_full(int fd, void *buf, size_t len, int timeout_ms)
{
    size_t done = 0;
    while (done < len) {
        int w = cp_wait_readable(fd, timeout_ms);
        if (w)
            return w;
        ssize_t n = read(fd, (char *)buf + done, len - done);
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        done += (size_t)n;
    }
    return (ssize_t)done;
}

ssize_t cp_pread_full(int fd, void *buf, size_t len, int64_t offset)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(offset + (int64_t)done));
        if (n == 0)
            break;
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        done += (size_t)n;
    }
    return (ssize_t)done;
}

ssize_t cp_pwrite_full(int fd, const void *buf, size_t len, int64_t offset)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(offset + (int64_t)done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        done += (size_t)n;
    }
    return (ssize_t)done;
}

ssize_t cp_vmsplice(int fd, void *addr, size_t len)
{
    struct iovec iov = {.iov_base = addr, .iov_len = len};
    ssize_t r = vmsplice(fd, &iov, 1, 0);
    return r < 0 ? -errno : r;
}
