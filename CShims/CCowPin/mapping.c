/* Mappings: mmap, munmap, mprotect, madvise, mremap, and how pages are mapped. */
#include "cowpin_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

void *cp_mmap_anon(size_t len, int shared, int extra_flags, int *err)
{
    int flags = (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS | extra_flags;
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) {
        *err = errno;
        return NULL;
    }
    return p;
}

void *cp_mmap_fd(size_t len, int prot, int shared, int fd, int64_t offset, int *err)
{
    void *p = mmap(NULL, len, prot, shared ? MAP_SHARED : MAP_PRIVATE, fd, (off_t)offset);
    if (p == MAP_FAILED) {
        *err = errno;
        return NULL;
    }
    return p;
}

int cp_munmap(void *addr, size_t len) { return munmap(addr, len) ? -errno : 0; }
int cp_mprotect(void *addr, size_t len, int prot) { return mprotect(addr, len, prot) ? -errno : 0; }
int cp_madvise(void *addr, size_t len, int advice) { return madvise(addr, len, advice) ? -errno : 0; }

/* MADV_PAGEOUT drains only the calling CPU's batch of new pages
 * (lru_add_drain() in madvise_pageout()), and reclaim skips a page that is
 * still in another CPU's batch: it is not on the LRU yet. Advising once on
 * each CPU this thread may run on drains every batch; the thread's CPU mask
 * is restored after. */
int cp_pageout_on_each_cpu(void *addr, size_t len)
{
    cpu_set_t saved, one;
    int r = 0;
    if (sched_getaffinity(0, sizeof saved, &saved))
        return -errno;
    for (int cpu = 0; cpu < CPU_SETSIZE && !r; cpu++) {
        if (!CPU_ISSET(cpu, &saved))
            continue;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        if (sched_setaffinity(0, sizeof one, &one))
            continue; /* offline since: its batch was drained when it went */
        if (madvise(addr, len, MADV_PAGEOUT))
            r = -errno;
    }
    sched_setaffinity(0, sizeof saved, &saved);
    return r;
}

/* The PAGEMAP_SCAN ABI (include/uapi/linux/fs.h, 6.7); older system headers lack it. */
struct cp_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
struct cp_page_region { uint64_t start, end, categories; };
#define CP_PAGEMAP_SCAN _IOWR('f', 16, struct cp_pm_scan_arg)
#define CP_PAGE_IS_HUGE (1 << 6)

int cp_pmd_mapped(void *addr, size_t len)
{
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct cp_page_region r[2];
    struct cp_pm_scan_arg a;
    memset(&a, 0, sizeof a);
    a.size = sizeof a;
    a.start = (uint64_t)(uintptr_t)addr;
    a.end = a.start + len;
    a.vec = (uint64_t)(uintptr_t)r;
    a.vec_len = 2;
    a.category_mask = CP_PAGE_IS_HUGE;
    a.return_mask = CP_PAGE_IS_HUGE;
    int n = ioctl(fd, CP_PAGEMAP_SCAN, &a);
    int err = errno;
    close(fd);
    if (n < 0) return -err;
    return n == 1 && r[0].start == a.start && r[0].end == a.end;
}

int cp_mremap_fixed(void *old_addr, size_t len, void *new_addr)
{
    void *p = mremap(old_addr, len, len, MREMAP_MAYMOVE | MREMAP_FIXED, new_addr);
    if (p == MAP_FAILED) return -errno;
    return p == new_addr ? 0 : -EFAULT;
}

void cp_touch_read(const void *addr, size_t len, size_t page_size)
{
    for (size_t i = 0; i < len; i += page_size)
        (void)*(const volatile uint8_t *)((const uint8_t *)addr + i);
}

long cp_page_size(void) { return sysconf(_SC_PAGESIZE); }
