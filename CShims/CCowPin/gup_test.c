/* The gup_test debugfs interface (CONFIG_GUP_TEST): long-term pins taken by the kernel. */
#include "cowpin_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/types.h>
#include <sys/ioctl.h>
#include <unistd.h>

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
