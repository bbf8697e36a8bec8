/* A swap device for swap-out cases: the header mkswap writes, swapon/swapoff. */
#include "cowpin_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/swap.h>
#include <unistd.h>

int cp_write_swap_header(const char *device, uint64_t size, size_t page_size)
{
    /* The first page: boot bits, then version, last page, bad pages; the
     * magic "SWAPSPACE2" in the page's last 10 bytes. */
    uint8_t page[65536];
    if (page_size > sizeof(page) || size / page_size < 10)
        return -EINVAL;
    memset(page, 0, page_size);
    uint32_t info[3] = {1, (uint32_t)(size / page_size - 1), 0};
    memcpy(page + 1024, info, sizeof(info));
    memcpy(page + page_size - 10, "SWAPSPACE2", 10);
    int fd = open(device, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    ssize_t n = cp_pwrite_full(fd, page, page_size, 0);
    int r = n == (ssize_t)page_size ? (fsync(fd) ? -errno : 0) : (n < 0 ? (int)n : -EIO);
    close(fd);
    return r;
}

int cp_swapon(const char *device) { return swapon(device, 0) ? -errno : 0; }
int cp_swapoff(const char *device) { return swapoff(device) ? -errno : 0; }
