/* io_uring through liburing, and the gup_test debugfs interface. */
#include "cowpin_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

struct cp_ring {
    struct io_uring ring;
};

int cp_ring_open(struct cp_ring **out, unsigned entries)
{
    struct cp_ring *r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    int ret = io_uring_queue_init(entries, &r->ring, 0);
    if (ret < 0) {
        free(r);
        return ret;
    }
    *out = r;
    return 0;
}

void cp_ring_close(struct cp_ring *r)
{
    if (!r)
        return;
    io_uring_queue_exit(&r->ring);
    free(r);
}

int cp_ring_register_buffer(struct cp_ring *r, void *addr, size_t len)
{
    struct iovec iov = {.iov_base = addr, .iov_len = len};
    return io_uring_register_buffers(&r->ring, &iov, 1);
}

int cp_ring_unregister_buffers(struct cp_ring *r) { return io_uring_unregister_buffers(&r->ring); }

int cp_ring_submit(struct cp_ring *r, int opcode, int fd, void *addr, size_t len,
                   int64_t offset, uint64_t user_data, int force_async)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    if (!sqe)
        return -EBUSY;
    switch (opcode) {
    case CP_RING_READ:
        io_uring_prep_read(sqe, fd, addr, (unsigned)len, (__u64)offset);
        break;
    case CP_RING_WRITE:
        io_uring_prep_write(sqe, fd, addr, (unsigned)len, (__u64)offset);
        break;
    case CP_RING_READ_FIXED:
        io_uring_prep_read_fixed(sqe, fd, addr, (unsigned)len, (__u64)offset, 0);
        break;
    case CP_RING_WRITE_FIXED:
        io_uring_prep_write_fixed(sqe, fd, addr, (unsigned)len, (__u64)offset, 0);
        break;
    default:
        return -EINVAL;
    }
    io_uring_sqe_set_data64(sqe, user_data);
    if (force_async)
        sqe->flags |= IOSQE_ASYNC;
    int ret = io_uring_submit(&r->ring);
    if (ret < 0)
        return ret;
    return ret == 1 ? 0 : -EIO;
}

int cp_ring_wait(struct cp_ring *r, int timeout_ms, uint64_t *user_data, int32_t *res)
{
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts = {.tv_sec = timeout_ms / 1000, .tv_nsec = (long long)(timeout_ms % 1000) * 1000000};
    int ret;
    do {
        ret = io_uring_wait_cqe_timeout(&r->ring, &cqe, &ts);
    } while (ret == -EINTR);
    if (ret == -ETIME)
        return -ETIMEDOUT;
    if (ret < 0)
        return ret;
    *user_data = io_uring_cqe_get_data64(cqe);
    *res = cqe->res;
    io_uring_cqe_seen(&r->ring, cqe);
    return 0;
}

/* The gup_test interface (mm/gup_test.h in the kernel tree; not exported). */
struct cp_pin_longterm_test {
    __u64 addr;
    __u64 size;
    __u32 flags;
};
#define CP_PIN_LONGTERM_TEST_START _IOW('g', 7, struct cp_pin_longterm_test)
#define CP_PIN_LONGTERM_TEST_STOP _IO('g', 8)
#define CP_PIN_LONGTERM_TEST_READ _IOW('g', 9, __u64)
#define CP_PIN_LONGTERM_FLAG_USE_WRITE 1
#define CP_PIN_LONGTERM_FLAG_USE_FAST 2

int cp_gup_test_open(const char *path)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

int cp_gup_pin_longterm_start(int fd, void *addr, size_t len, int write, int fast)
{
    struct cp_pin_longterm_test args = {
        .addr = (__u64)(uintptr_t)addr,
        .size = len,
        .flags = (write ? CP_PIN_LONGTERM_FLAG_USE_WRITE : 0) | (fast ? CP_PIN_LONGTERM_FLAG_USE_FAST : 0),
    };
    return ioctl(fd, CP_PIN_LONGTERM_TEST_START, &args) ? -errno : 0;
}

int cp_gup_pin_longterm_read(int fd, void *dst)
{
    __u64 to = (__u64)(uintptr_t)dst;
    return ioctl(fd, CP_PIN_LONGTERM_TEST_READ, &to) ? -errno : 0;
}

int cp_gup_pin_longterm_stop(int fd) { return ioctl(fd, CP_PIN_LONGTERM_TEST_STOP) ? -errno : 0; }
