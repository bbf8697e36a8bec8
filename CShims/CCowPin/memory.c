/* Memory, buffers and file descriptors. */
#include "cowpin_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

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

/* One 64-bit word of the pattern: a mix of the seed and the word's index. */
/* The case's pattern: word i is a hash of (seed, i mod 512) salted with the
 * page number (i / 512), so every 8 bytes of a page differ, every page
 * differs, and filling or checking costs one xor per word after 512 hashes. */
#define PATTERN_PAGE_WORDS 512

static uint64_t pattern_mix(uint32_t seed, uint64_t k)
{
    uint64_t x = k * 0x9E3779B97F4A7C15ull ^ (((uint64_t)seed << 32) | seed);
    x ^= x >> 31;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 29;
    return x;
}

static uint64_t pattern_salt(uint64_t page) { return page * 0xD1B54A32D192ED03ull; }

static uint64_t pattern_word(uint32_t seed, uint64_t word_index)
{
    return pattern_mix(seed, word_index % PATTERN_PAGE_WORDS) ^ pattern_salt(word_index / PATTERN_PAGE_WORDS);
}

static void pattern_table(uint32_t seed, uint64_t table[PATTERN_PAGE_WORDS])
{
    for (uint64_t k = 0; k < PATTERN_PAGE_WORDS; k++)
        table[k] = pattern_mix(seed, k);
}

uint8_t cp_pattern_byte(uint32_t seed, size_t offset)
{
    return (uint8_t)(pattern_word(seed, offset >> 3) >> ((offset & 7) * 8));
}

/* The words of one pattern page from a word index on: the table entries,
 * the page's salt, and how many (to the page's end, at most `avail`). Going
 * a page at a time keeps the salt constant, so the loops over it vectorise. */
struct pattern_run {
    const uint64_t *table;
    uint64_t salt;
    size_t words;
};

static struct pattern_run pattern_run_at(const uint64_t *table, uint64_t word_index, size_t avail)
{
    size_t k = (size_t)(word_index % PATTERN_PAGE_WORDS), n = PATTERN_PAGE_WORDS - k;
    return (struct pattern_run){table + k, pattern_salt(word_index / PATTERN_PAGE_WORDS), n < avail ? n : avail};
}

/* Async-signal-safe (a child may fill): the table lives on the stack. */
void cp_fill_pattern(void *addr, size_t len, uint32_t seed, size_t base_offset)
{
    uint8_t *p = addr;
    size_t i = 0;
    while (i < len && ((base_offset + i) & 7))
        p[i] = cp_pattern_byte(seed, base_offset + i), i++;
    if (len - i >= 8) {
        uint64_t table[PATTERN_PAGE_WORDS];
        pattern_table(seed, table);
        while (len - i >= 8) {
            struct pattern_run r = pattern_run_at(table, (base_offset + i) >> 3, (len - i) / 8);
            for (size_t k = 0; k < r.words; k++) {
                uint64_t w = r.table[k] ^ r.salt;
                memcpy(p + i + 8 * k, &w, 8);
            }
            i += 8 * r.words;
        }
    }
    for (; i < len; i++)
        p[i] = cp_pattern_byte(seed, base_offset + i);
}

int cp_matches_pattern(const void *buf, size_t len, uint32_t seed, size_t base_offset)
{
    const uint8_t *p = buf;
    size_t i = 0;
    while (i < len && ((base_offset + i) & 7)) {
        if (p[i] != cp_pattern_byte(seed, base_offset + i))
            return 0;
        i++;
    }
    if (len - i >= 8) {
        uint64_t table[PATTERN_PAGE_WORDS];
        pattern_table(seed, table);
        /* A pattern page at a time: or the xor of every word, then test. */
        while (len - i >= 8) {
            struct pattern_run r = pattern_run_at(table, (base_offset + i) >> 3, (len - i) / 8);
            uint64_t diff = 0;
            for (size_t k = 0; k < r.words; k++) {
                uint64_t w;
                memcpy(&w, p + i + 8 * k, 8);
                diff |= w ^ r.table[k] ^ r.salt;
            }
            if (diff)
                return 0;
            i += 8 * r.words;
        }
    }
    for (; i < len; i++)
        if (p[i] != cp_pattern_byte(seed, base_offset + i))
            return 0;
    return 1;
}

long cp_smaps_value(const char *text, size_t len, uint64_t addr, const char *key)
{
    size_t keylen = strlen(key);
    int inside = 0;
    const char *end = text + len;
    for (const char *line = text; line < end;) {
        const char *nl = memchr(line, '\n', (size_t)(end - line));
        const char *eol = nl ? nl : end;
        /* A VMA header starts with "lo-hi "; field lines start with "Key:". */
        char *dash;
        unsigned long long lo = strtoull(line, &dash, 16);
        if (dash < eol && *dash == '-' && dash > line) {
            char *sp;
            unsigned long long hi = strtoull(dash + 1, &sp, 16);
            if (sp < eol && *sp == ' ') {
                if (inside)
                    return -1;
                inside = addr >= lo && addr < hi;
                line = eol + 1;
                continue;
            }
        }
        if (inside && (size_t)(eol - line) > keylen && !memcmp(line, key, keylen) && line[keylen] == ':')
            return strtol(line + keylen + 1, NULL, 10);
        line = eol + 1;
    }
    return -1;
}

int cp_all_equal(const void *buf, size_t len, uint8_t byte)
{
    const uint8_t *p = buf;
    size_t head = len < 256 ? len : 256;
    for (size_t i = 0; i < head; i++)
        if (p[i] != byte)
            return 0;
    /* The head holds only `byte`; the rest does too exactly when the buffer
     * equals itself shifted by the head's length (memcmp is vectorised). */
    return len == head || memcmp(p, p + head, len - head) == 0;
}

size_t cp_diff_ranges(const void *a, const void *b, size_t len, size_t gap,
                      struct cp_range *out, size_t max)
{
    const uint8_t *x = a, *y = b;
    size_t found = 0, i = 0;
    while (i < len) {
        /* Skip equal 8-byte words quickly, then equal bytes. */
        if (!(i & 7) && i + 8 <= len && !memcmp(x + i, y + i, 8)) {
            i += 8;
            continue;
        }
        if (x[i] == y[i]) {
            i++;
            continue;
        }
        /* [start, end) differs; extend while the next difference is within gap. */
        size_t start = i, end = i + 1;
        for (size_t j = end; j < len && j - end <= gap; j++)
            if (x[j] != y[j])
                end = j + 1;
        if (found < max) {
            out[found].offset = start;
            out[found].length = end - start;
        }
        found++;
        i = end;
    }
    return found;
}

void cp_diff_count(const void *a, const void *b, size_t len, size_t page_size,
                   uint64_t *bytes, uint64_t *pages)
{
    const uint8_t *x = a, *y = b;
    uint64_t nb = 0, np = 0;
    for (size_t page = 0; page < len; page += page_size) {
        size_t end = page + page_size < len ? page + page_size : len;
        uint64_t here = 0;
        if (!memcmp(x + page, y + page, end - page))
            continue;
        for (size_t i = page; i < end; i++)
            here += x[i] != y[i];
        nb += here;
        np += here > 0;
    }
    *bytes = nb;
    *pages = np;
}

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

long cp_page_size(void) { return sysconf(_SC_PAGESIZE); }

const char *cp_strerror(int err, char *buf, size_t len)
{
    /* GNU strerror_r may return a static string instead of filling buf. */
    return strerror_r(err, buf, len);
}

int cp_getrlimit_memlock(uint64_t *soft, uint64_t *hard)
{
    struct rlimit r;
    if (getrlimit(RLIMIT_MEMLOCK, &r))
        return -errno;
    *soft = r.rlim_cur;
    *hard = r.rlim_max;
    return 0;
}

ssize_t cp_read_gzip(const char *path, void *buf, size_t len)
{
    gzFile f = gzopen(path, "rb");
    if (!f)
        return errno ? -errno : -EIO;
    size_t done = 0;
    while (done < len) {
        int n = gzread(f, (char *)buf + done, (unsigned)(len - done > (1u << 30) ? (1u << 30) : len - done));
        if (n < 0) {
            gzclose(f);
            return -EIO;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    gzclose(f);
    return (ssize_t)done;
}
