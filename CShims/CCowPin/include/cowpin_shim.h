/*
 * cowpin's C shim: thin, typed wrappers over the syscalls cowpin needs, and
 * every line of code that runs in a child process after fork().
 *
 * Conventions: functions return 0 (or a non-negative count) on success and
 * -errno on failure. Nothing here allocates except cp_ring_open().
 */
#ifndef COWPIN_SHIM_H
#define COWPIN_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <fcntl.h>
#include <linux/fuse.h>

/* O_DIRECT needs _GNU_SOURCE, which Swift's importer does not define. */
enum { CP_O_DIRECT = __O_DIRECT };

#ifdef __cplusplus
extern "C" {
#endif

/* ---- memory ------------------------------------------------------------ */

/* mmap(NULL, len, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|extra_flags).
 * Returns NULL and sets *err (positive errno) on failure. */
void *cp_mmap_anon(size_t len, int shared, int extra_flags, int *err);
/* mmap of a file descriptor; NULL and *err on failure. */
void *cp_mmap_fd(size_t len, int prot, int shared, int fd, int64_t offset, int *err);
int cp_munmap(void *addr, size_t len);
int cp_mprotect(void *addr, size_t len, int prot);
int cp_madvise(void *addr, size_t len, int advice);
/* MADV_PAGEOUT once on each CPU the thread may run on (each CPU's batch of new pages drained). */
int cp_pageout_on_each_cpu(void *addr, size_t len);
/* Whether all of [addr, addr+len) is mapped by huge page table entries (a
 * PMD-mapped THP): 1 or 0, from the PAGEMAP_SCAN ioctl (PAGE_IS_HUGE, 6.7+);
 * -errno when the kernel has no PAGEMAP_SCAN (the caller reads smaps). */
int cp_pmd_mapped(void *addr, size_t len);
/* mremap(MREMAP_MAYMOVE|MREMAP_FIXED) of [old, old+len) to new_addr; 0 or -errno. */
int cp_mremap_fixed(void *old_addr, size_t len, void *new_addr);

enum {
    CP_PROT_READ = 1,
    CP_PROT_READ_WRITE = 3,
};

/* mmap flags for anonymous hugetlb memory of 2^shift bytes. */
enum {
    CP_MAP_HUGETLB = 0x40000,
    CP_MAP_HUGE_SHIFT = 26,
};

/* madvise() advice values; some are newer than the C library's headers. */
enum {
    CP_MADV_DONTNEED = 4,
    CP_MADV_DONTFORK = 10,
    CP_MADV_DOFORK = 11,
    CP_MADV_MERGEABLE = 12,
    CP_MADV_HUGEPAGE = 14,
    CP_MADV_NOHUGEPAGE = 15,
    CP_MADV_WIPEONFORK = 18,
    CP_MADV_PAGEOUT = 21,
    CP_MADV_POPULATE_WRITE = 23,
    CP_MADV_COLLAPSE = 25,
};

long cp_page_size(void);

/* Read one byte of every page (a read fault: maps the zeropage or pagecache). */
void cp_touch_read(const void *addr, size_t len, size_t page_size);
/* Fill [addr, addr+len) with cowpin's position-dependent pattern for seed. */
void cp_fill_pattern(void *addr, size_t len, uint32_t seed, size_t base_offset);
/* Byte `offset` of the pattern for seed (what cp_fill_pattern writes there). */
uint8_t cp_pattern_byte(uint32_t seed, size_t offset);

/* 1 when every byte of buf equals byte. */
int cp_all_equal(const void *buf, size_t len, uint8_t byte);
/* 1 when buf matches cowpin's pattern for seed at base_offset. */
int cp_matches_pattern(const void *buf, size_t len, uint32_t seed, size_t base_offset);

/* ---- file descriptors -------------------------------------------------- */

int cp_pipe(int fds[2]);                  /* O_CLOEXEC */
int cp_set_pipe_size(int fd, int size);   /* returns the new size */
int cp_close(int fd);
/* Write one byte; 0 or -errno. */
int cp_signal(int fd);
/* Wait at most timeout_ms for one byte. 0, -ETIMEDOUT, -EPIPE (writer gone). */
int cp_await(int fd, int timeout_ms);
/* The same, returning the byte read in *value. */
int cp_await_value(int fd, int timeout_ms, uint8_t *value);
/* Wait at most timeout_ms until fd is readable (nothing is read). */
int cp_wait_readable(int fd, int timeout_ms);
/* Read exactly len bytes, each wait bounded by timeout_ms. Returns the number
 * read (less than len at end of file) or -errno / -ETIMEDOUT. */
ssize_t cp_read_full(int fd, void *buf, size_t len, int timeout_ms);
ssize_t cp_pread_full(int fd, void *buf, size_t len, int64_t offset);
ssize_t cp_pwrite_full(int fd, const void *buf, size_t len, int64_t offset);
/* vmsplice(fd, {addr,len}, 1, 0): bytes transferred or -errno. */
ssize_t cp_vmsplice(int fd, void *addr, size_t len);

/* ---- children ------------------------------------------------------------
 * A child runs a small program of operations, written by the parent before
 * fork(). The interpreter is async-signal-safe: no malloc, no locks, no
 * stdio, only syscalls. Each operation's result goes to the status block,
 * which the parent places in MAP_SHARED memory.
 */
enum cp_op_kind {
    CP_OP_END = 0,
    CP_OP_SIGNAL,      /* write a byte to fd */
    CP_OP_AWAIT,       /* wait (bounded by arg ms) for a byte on fd */
    CP_OP_FILL,        /* memset(addr, arg, len) */
    CP_OP_VERIFY,      /* check len bytes at addr against the report at addr2 (see below) */
    CP_OP_MUNMAP,      /* munmap(addr, len) */
    CP_OP_MPROTECT,    /* mprotect(addr, len, arg) */
    CP_OP_VMSPLICE,    /* vmsplice(fd, {addr, len}); result = bytes */
    CP_OP_READ,        /* read exactly len bytes of fd into addr2, each wait bounded by
                        * arg ms; result = bytes; a short read fails with ENODATA */
};

struct cp_op {
    uint32_t kind;
    int32_t fd;
    void *addr;
    void *addr2;
    uint64_t len;
    int64_t arg;
};

#define CP_MAX_OPS 32

struct cp_child_status {
    int32_t done;          /* number of operations completed */
    int32_t failed_op;     /* index of the failed operation, -1 if none */
    int32_t failed_errno;
    int32_t reserved;
    int64_t result[CP_MAX_OPS];
};

/* A child's report on its view of the region (CP_OP_VERIFY). The parent
 * writes what the view should hold, as stretches of one content each, before
 * fork(); the child checks its view in place and, only when it differs (or
 * when there are no stretches: a layout the parent did not encode), copies it
 * to copy_to. status is CP_REPORT_NONE until the child has finished: a child
 * that died before reporting never reads as a report. */
enum cp_content_kind {
    CP_CONTENT_FILL = 1,     /* every byte is value */
    CP_CONTENT_PATTERN = 2,  /* cp_fill_pattern(seed = value) at the stretch's region offset */
};

struct cp_stretch {
    uint64_t offset;         /* region offset */
    uint64_t length;
    uint32_t kind;           /* enum cp_content_kind */
    uint32_t value;
};

#define CP_MAX_STRETCHES 64

enum cp_report_status {
    CP_REPORT_NONE = 0,      /* no report (yet) */
    CP_REPORT_MATCHES = 1,   /* the view held exactly the stretches; nothing copied */
    CP_REPORT_COPIED = 2,    /* the view is at copy_to: it differs, or was not checked */
};

struct cp_report {
    uint32_t status;         /* enum cp_report_status; written last, by the child */
    uint32_t count;          /* stretches; 0: copy without checking */
    uint64_t offset;         /* region offset of the view */
    uint64_t length;
    void *copy_to;           /* where a differing view goes (equal to the view: it is there already) */
    struct cp_stretch stretch[CP_MAX_STRETCHES];
};

/* 1 when view (region offsets [r->offset, r->offset + r->length)) holds every
 * stretch, 0 when not or when r has no stretches. Async-signal-safe. */
int cp_report_matches(const struct cp_report *r, const void *view);
/* r->status, read after the child wrote it (enum cp_report_status). */
uint32_t cp_report_status(const struct cp_report *r);

/* Child exit codes. */
enum {
    CP_CHILD_OK = 0,
    CP_CHILD_OP_FAILED = 101,
    CP_CHILD_BAD_PROGRAM = 102,
};

/* fork(); the child runs ops[0..n) and exits. Returns the child's pid and a
 * pidfd (for bounded waits) or -errno. */
int cp_spawn(const struct cp_op *ops, size_t n, struct cp_child_status *status,
             pid_t *pid_out, int *pidfd_out);
/* Wait at most timeout_ms for the child to exit, then reap it. On timeout the
 * child is killed with SIGKILL, reaped, and -ETIMEDOUT is returned.
 * *wstatus gets the waitpid() status. */
int cp_reap(pid_t pid, int pidfd, int timeout_ms, int *wstatus);
/* SIGKILL and reap (bounded); for cleanup paths. */
void cp_kill_reap(pid_t pid, int pidfd);

int cp_wexitstatus(int wstatus);
int cp_wifsignaled(int wstatus);
int cp_wtermsig(int wstatus);

/* ---- io_uring ------------------------------------------------------------ */

struct cp_ring;
int cp_ring_open(struct cp_ring **out, unsigned entries);
void cp_ring_close(struct cp_ring *ring);
int cp_ring_register_buffer(struct cp_ring *ring, void *addr, size_t len);
int cp_ring_unregister_buffers(struct cp_ring *ring);

enum cp_ring_opcode {
    CP_RING_READ = 0,        /* IORING_OP_READ */
    CP_RING_WRITE = 1,       /* IORING_OP_WRITE */
    CP_RING_READ_FIXED = 2,  /* IORING_OP_READ_FIXED, buffer index 0 */
    CP_RING_WRITE_FIXED = 3, /* IORING_OP_WRITE_FIXED, buffer index 0 */
};
/* Queue and submit one request; its completion carries user_data. With
 * force_async the request goes to an io-wq worker at once (IOSQE_ASYNC), so
 * a request that blocks never blocks the submitter. */
int cp_ring_submit(struct cp_ring *ring, int opcode, int fd, void *addr,
                   size_t len, int64_t offset, uint64_t user_data, int force_async);
/* Wait at most timeout_ms for a completion: 0 with *user_data and *res, or
 * -ETIMEDOUT / -errno. */
int cp_ring_wait(struct cp_ring *ring, int timeout_ms, uint64_t *user_data, int32_t *res);

/* ---- gup_test (CONFIG_GUP_TEST, debugfs) ----------------------------------- */

int cp_gup_test_open(const char *path);
/* PIN_LONGTERM_TEST_START: pin [addr, addr+len), R/O unless write. */
int cp_gup_pin_longterm_start(int fd, void *addr, size_t len, int write, int fast);
/* PIN_LONGTERM_TEST_READ: copy what the pinned pages hold into dst. */
int cp_gup_pin_longterm_read(int fd, void *dst);
int cp_gup_pin_longterm_stop(int fd);

/* ---- VFIO (type1 IOMMU) ------------------------------------------------------ */

/* /dev/vfio/vfio with API version and type1 support checked: fd or -errno. */
int cp_vfio_open_container(void);
/* Opens a group, checks it is viable, adds it to the container and sets the
 * type1 IOMMU (v2 when offered): group fd or -errno. */
int cp_vfio_open_group(int container, const char *path);
int cp_vfio_device_fd(int group, const char *bdf);
/* Offset (in the device fd) and size of region `index` (BAR0 = 0, config = 7). */
int cp_vfio_region(int device, uint32_t index, uint64_t *offset, uint64_t *size);
/* VFIO_IOMMU_MAP_DMA: the device may read [vaddr, vaddr+size) at iova, and
 * write it too when writable. This is the long-term pin. */
int cp_vfio_map_dma(int container, void *vaddr, uint64_t iova, uint64_t size, int writable);
int cp_vfio_unmap_dma(int container, uint64_t iova, uint64_t size);

enum { CP_VFIO_BAR0 = 0, CP_VFIO_CONFIG = 7 };

/* ---- RDMA verbs (libibverbs, loaded with dlopen() when first used) ----------- */

/* Loads libibverbs.so.1: 0, or -errno with the reason in why. */
int cp_rdma_load(char *why, size_t len);
/* rdma-core's ibv_is_fork_initialized(): CP_IBV_FORK_*, or -errno. */
int cp_rdma_fork_status(void);
enum { CP_IBV_FORK_DISABLED = 0, CP_IBV_FORK_ENABLED = 1, CP_IBV_FORK_UNNEEDED = 2 };
/* ibv_access_flags cowpin uses (the values of <infiniband/verbs.h>). */
enum { CP_IBV_ACCESS_LOCAL_WRITE = 1, CP_IBV_ACCESS_REMOTE_WRITE = 2, CP_IBV_ACCESS_REMOTE_READ = 4 };
struct cp_rdma;
/* Opens `device`, a protection domain, a CQ and two RC QPs connected to
 * each other through the GID at gid_index of `port`: 0 or -errno (why). */
int cp_rdma_open(const char *device, uint8_t port, int gid_index, struct cp_rdma **out, char *why, size_t len);
void cp_rdma_close(struct cp_rdma *r);
/* ibv_reg_mr() with CP_IBV_ACCESS_* flags: the kernel pins the pages. */
int cp_rdma_reg_mr(struct cp_rdma *r, void *addr, size_t length, int access, void **mr, uint32_t *lkey, uint32_t *rkey);
int cp_rdma_dereg_mr(void *mr);
/* One RDMA READ (write = 0: the responder reads `length` bytes of the
 * region at remote/rkey into local/lkey) or RDMA WRITE (the responder writes
 * local into the region), waited for (bounded): 0 with the bytes moved in
 * *byte_len, or -errno (why). */
int cp_rdma_transfer(struct cp_rdma *r, int write, void *local, uint32_t lkey, uint64_t remote, uint32_t rkey,
                     uint32_t length, int timeout_ms, uint32_t *byte_len, char *why, size_t len);

/* ---- swap ------------------------------------------------------------------ */

/* Writes a version-1 swap header (what mkswap writes) for a device of `size` bytes. */
int cp_write_swap_header(const char *device, uint64_t size, size_t page_size);
int cp_swapon(const char *device);
int cp_swapoff(const char *device);

#ifdef __cplusplus
}
#endif

#endif /* COWPIN_SHIM_H */
