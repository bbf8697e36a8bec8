/* io_uring through liburing. */
#include "cowpin_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdlib.h>
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
