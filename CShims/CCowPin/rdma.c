/*
 * RDMA verbs through libibverbs, loaded with dlopen() when first needed.
 *
 * cowpin registers a memory region (ibv_reg_mr: the kernel's ib_umem_get(),
 * a FOLL_LONGTERM pin) and observes what the device reads from it and writes
 * into it, through a reliable-connected queue pair connected to a second QP
 * on the same port (a loopback pair: no connection manager, no peer).
 *
 * libibverbs is loaded at run time rather than linked: a cowpin binary runs
 * on machines (and in VMs that share the build machine's files) that have no
 * RDMA library, and only the RDMA cases need it; they skip with the reason.
 * Building needs only the headers (libibverbs-dev); without them the same
 * calls return -ENOSYS and the cases skip saying so.
 *
 * Everything here runs in the parent: a forked child never calls into verbs.
 */
#include "cowpin_shim.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void say(char *why, size_t len, const char *fmt, ...)
{
    if (!why || !len)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, len, fmt, ap);
    va_end(ap);
}

#if __has_include(<infiniband/verbs.h>)
#include <infiniband/verbs.h>

/* The entry points cowpin calls, resolved once. ibv_post_send() and
 * ibv_poll_cq() are inline in verbs.h (they call the provider through the
 * context), so they need no symbol. */
static struct {
    int state; /* 0 not tried, 1 loaded, -1 failed */
    char error[256];
    struct ibv_device **(*get_device_list)(int *);
    void (*free_device_list)(struct ibv_device **);
    const char *(*get_device_name)(struct ibv_device *);
    struct ibv_context *(*open_device)(struct ibv_device *);
    int (*close_device)(struct ibv_context *);
    struct ibv_pd *(*alloc_pd)(struct ibv_context *);
    int (*dealloc_pd)(struct ibv_pd *);
    struct ibv_mr *(*reg_mr)(struct ibv_pd *, void *, size_t, int);
    int (*dereg_mr)(struct ibv_mr *);
    struct ibv_cq *(*create_cq)(struct ibv_context *, int, void *, struct ibv_comp_channel *, int);
    int (*destroy_cq)(struct ibv_cq *);
    struct ibv_qp *(*create_qp)(struct ibv_pd *, struct ibv_qp_init_attr *);
    int (*destroy_qp)(struct ibv_qp *);
    int (*modify_qp)(struct ibv_qp *, struct ibv_qp_attr *, int);
    int (*query_gid)(struct ibv_context *, uint8_t, int, union ibv_gid *);
    enum ibv_fork_status (*is_fork_initialized)(void);
    const char *(*wc_status_str)(enum ibv_wc_status);
} verbs;

/* libibverbs and its symbols. A static executable (scripts/build-static)
 * loads no shared library, and a reference to glibc's static dlopen() breaks
 * its link: there the RDMA cases skip saying so. */
#ifdef COWPIN_STATIC_EXECUTABLE
static void *open_library(void)
{
    snprintf(verbs.error, sizeof(verbs.error), "this cowpin is a static executable, which cannot load libibverbs: the RDMA cases need the ordinary build");
    return NULL;
}
static void *symbol(void *lib, const char *name) { (void)lib, (void)name; return NULL; }
#else
static void *open_library(void)
{
    void *lib = dlopen("libibverbs.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib)
        snprintf(verbs.error, sizeof(verbs.error), "cannot load libibverbs.so.1 (%s): install ibverbs-providers, or run scripts/setup", dlerror());
    return lib;
}
static void *symbol(void *lib, const char *name) { return dlsym(lib, name); }
#endif

int cp_rdma_load(char *why, size_t len)
{
    if (verbs.state == 0) {
        void *lib = open_library();
        verbs.state = lib ? 0 : -1;
#define SYM(field, name)                                                                                       \
    do {                                                                                                       \
        if (verbs.state == 0 && !(*(void **)&verbs.field = symbol(lib, name))) {                               \
            snprintf(verbs.error, sizeof(verbs.error), "libibverbs.so.1 has no %s", name);                    \
            verbs.state = -1;                                                                                  \
        }                                                                                                      \
    } while (0)
        SYM(get_device_list, "ibv_get_device_list");
        SYM(free_device_list, "ibv_free_device_list");
        SYM(get_device_name, "ibv_get_device_name");
        SYM(open_device, "ibv_open_device");
        SYM(close_device, "ibv_close_device");
        SYM(alloc_pd, "ibv_alloc_pd");
        SYM(dealloc_pd, "ibv_dealloc_pd");
        SYM(reg_mr, "ibv_reg_mr");
        SYM(dereg_mr, "ibv_dereg_mr");
        SYM(create_cq, "ibv_create_cq");
        SYM(destroy_cq, "ibv_destroy_cq");
        SYM(create_qp, "ibv_create_qp");
        SYM(destroy_qp, "ibv_destroy_qp");
        SYM(modify_qp, "ibv_modify_qp");
        SYM(query_gid, "ibv_query_gid");
        SYM(is_fork_initialized, "ibv_is_fork_initialized");
        SYM(wc_status_str, "ibv_wc_status_str");
#undef SYM
        if (verbs.state == 0)
            verbs.state = 1;
    }
    if (verbs.state < 0) {
        say(why, len, "%s", verbs.error);
        return -ENOENT;
    }
    return 0;
}

int cp_rdma_fork_status(void)
{
    if (cp_rdma_load(NULL, 0) < 0)
        return -ENOENT;
    switch (verbs.is_fork_initialized()) {
    case IBV_FORK_DISABLED: return CP_IBV_FORK_DISABLED;
    case IBV_FORK_ENABLED: return CP_IBV_FORK_ENABLED;
    case IBV_FORK_UNNEEDED: return CP_IBV_FORK_UNNEEDED;
    }
    return -EINVAL;
}

struct cp_rdma {
    struct ibv_context *context;
    struct ibv_pd *pd;
    struct ibv_cq *cq;
    /* qp[0] posts the work requests; qp[1], connected to it, responds. */
    struct ibv_qp *qp[2];
    uint8_t port;
};

void cp_rdma_close(struct cp_rdma *r)
{
    if (!r)
        return;
    for (int i = 0; i < 2; i++)
        if (r->qp[i])
            verbs.destroy_qp(r->qp[i]);
    if (r->cq)
        verbs.destroy_cq(r->cq);
    if (r->pd)
        verbs.dealloc_pd(r->pd);
    if (r->context)
        verbs.close_device(r->context);
    free(r);
}

/* RESET -> INIT -> RTR -> RTS, connected to the QP numbered `peer` on the
 * same port through the GID at `gid_index` (RoCE needs a global route). */
static int connect_qp(struct ibv_qp *qp, uint32_t peer, uint8_t port, int gid_index, const union ibv_gid *gid,
                      char *why, size_t len)
{
    struct ibv_qp_attr a;
    memset(&a, 0, sizeof(a));
    a.qp_state = IBV_QPS_INIT;
    a.pkey_index = 0;
    a.port_num = port;
    a.qp_access_flags = IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_READ | IBV_ACCESS_REMOTE_WRITE;
    int e = verbs.modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS);
    if (e) {
        say(why, len, "ibv_modify_qp(INIT): %s", strerror(e));
        return -e;
    }
    memset(&a, 0, sizeof(a));
    a.qp_state = IBV_QPS_RTR;
    a.path_mtu = IBV_MTU_1024;
    a.dest_qp_num = peer;
    a.rq_psn = 0;
    a.max_dest_rd_atomic = 1;
    a.min_rnr_timer = 12;
    a.ah_attr.is_global = 1;
    a.ah_attr.grh.dgid = *gid;
    a.ah_attr.grh.sgid_index = (uint8_t)gid_index;
    a.ah_attr.grh.hop_limit = 1;
    a.ah_attr.port_num = port;
    e = verbs.modify_qp(qp, &a,
                        IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                            IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER);
    if (e) {
        say(why, len, "ibv_modify_qp(RTR, GID index %d): %s", gid_index, strerror(e));
        return -e;
    }
    memset(&a, 0, sizeof(a));
    a.qp_state = IBV_QPS_RTS;
    a.timeout = 14;
    a.retry_cnt = 7;
    a.rnr_retry = 7;
    a.sq_psn = 0;
    a.max_rd_atomic = 1;
    e = verbs.modify_qp(qp, &a,
                        IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                            IBV_QP_MAX_QP_RD_ATOMIC);
    if (e) {
        say(why, len, "ibv_modify_qp(RTS): %s", strerror(e));
        return -e;
    }
    return 0;
}

int cp_rdma_open(const char *device, uint8_t port, int gid_index, struct cp_rdma **out, char *why, size_t len)
{
    int e = cp_rdma_load(why, len);
    if (e < 0)
        return e;
    int n = 0;
    struct ibv_device **list = verbs.get_device_list(&n);
    if (!list) {
        e = errno ? errno : ENODEV;
        say(why, len, "ibv_get_device_list: %s", strerror(e));
        return -e;
    }
    struct ibv_device *dev = NULL;
    for (int i = 0; i < n; i++)
        if (strcmp(verbs.get_device_name(list[i]), device) == 0)
            dev = list[i];
    struct cp_rdma *r = calloc(1, sizeof(*r));
    if (!r) {
        verbs.free_device_list(list);
        return -ENOMEM;
    }
    r->port = port;
    if (!dev) {
        say(why, len, "libibverbs lists no device %s (%d device(s): is the provider, e.g. librxe, installed and named in /etc/libibverbs.d?)", device, n);
        e = -ENODEV;
        goto fail;
    }
    r->context = verbs.open_device(dev);
    if (!r->context) {
        e = -(errno ? errno : ENODEV);
        say(why, len, "ibv_open_device(%s): %s", device, strerror(-e));
        goto fail;
    }
    union ibv_gid gid;
    if ((e = verbs.query_gid(r->context, port, gid_index, &gid)) != 0) {
        e = -(e > 0 ? e : errno ? errno : EINVAL);
        say(why, len, "ibv_query_gid(%s port %u index %d): %s", device, port, gid_index, strerror(-e));
        goto fail;
    }
    r->pd = verbs.alloc_pd(r->context);
    if (!r->pd) {
        e = -(errno ? errno : ENOMEM);
        say(why, len, "ibv_alloc_pd: %s", strerror(-e));
        goto fail;
    }
    r->cq = verbs.create_cq(r->context, 16, NULL, NULL, 0);
    if (!r->cq) {
        e = -(errno ? errno : ENOMEM);
        say(why, len, "ibv_create_cq: %s", strerror(-e));
        goto fail;
    }
    for (int i = 0; i < 2; i++) {
        struct ibv_qp_init_attr init;
        memset(&init, 0, sizeof(init));
        init.send_cq = r->cq;
        init.recv_cq = r->cq;
        init.qp_type = IBV_QPT_RC;
        init.sq_sig_all = 1;
        init.cap.max_send_wr = 4;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        r->qp[i] = verbs.create_qp(r->pd, &init);
        if (!r->qp[i]) {
            e = -(errno ? errno : ENOMEM);
            say(why, len, "ibv_create_qp(RC): %s", strerror(-e));
            goto fail;
        }
    }
    for (int i = 0; i < 2; i++)
        if ((e = connect_qp(r->qp[i], r->qp[1 - i]->qp_num, port, gid_index, &gid, why, len)) < 0)
            goto fail;
    verbs.free_device_list(list);
    *out = r;
    return 0;
fail:
    cp_rdma_close(r);
    verbs.free_device_list(list);
    return e;
}

int cp_rdma_reg_mr(struct cp_rdma *r, void *addr, size_t length, int access, void **mr, uint32_t *lkey, uint32_t *rkey)
{
    int ibv = 0;
    if (access & CP_IBV_ACCESS_LOCAL_WRITE)
        ibv |= IBV_ACCESS_LOCAL_WRITE;
    if (access & CP_IBV_ACCESS_REMOTE_WRITE)
        ibv |= IBV_ACCESS_REMOTE_WRITE;
    if (access & CP_IBV_ACCESS_REMOTE_READ)
        ibv |= IBV_ACCESS_REMOTE_READ;
    errno = 0;
    struct ibv_mr *m = verbs.reg_mr(r->pd, addr, length, ibv);
    if (!m)
        return -(errno ? errno : EINVAL);
    *mr = m;
    *lkey = m->lkey;
    *rkey = m->rkey;
    return 0;
}

int cp_rdma_dereg_mr(void *mr)
{
    int e = verbs.dereg_mr(mr);
    return e > 0 ? -e : e;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

int cp_rdma_transfer(struct cp_rdma *r, int write, void *local, uint32_t lkey, uint64_t remote, uint32_t rkey,
                     uint32_t length, int timeout_ms, uint32_t *byte_len, char *why, size_t len)
{
    struct ibv_sge sge = {.addr = (uintptr_t)local, .length = length, .lkey = lkey};
    struct ibv_send_wr wr, *bad = NULL;
    memset(&wr, 0, sizeof(wr));
    wr.wr_id = 0xc0;
    wr.sg_list = &sge;
    wr.num_sge = 1;
    wr.opcode = write ? IBV_WR_RDMA_WRITE : IBV_WR_RDMA_READ;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr.rdma.remote_addr = remote;
    wr.wr.rdma.rkey = rkey;
    const char *op = write ? "RDMA WRITE" : "RDMA READ";
    int e = ibv_post_send(r->qp[0], &wr, &bad);
    if (e) {
        say(why, len, "ibv_post_send(%s): %s", op, strerror(e));
        return -e;
    }
    uint64_t deadline = now_ms() + (uint64_t)timeout_ms;
    struct ibv_wc wc;
    for (;;) {
        int n = ibv_poll_cq(r->cq, 1, &wc);
        if (n < 0) {
            say(why, len, "ibv_poll_cq: %d", n);
            return -EIO;
        }
        if (n == 1)
            break;
        if (now_ms() > deadline) {
            say(why, len, "no completion of the %s within %d ms", op, timeout_ms);
            return -ETIMEDOUT;
        }
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    if (wc.status != IBV_WC_SUCCESS) {
        say(why, len, "%s completed with %s (vendor error 0x%x)", op, verbs.wc_status_str(wc.status), wc.vendor_err);
        return -EIO;
    }
    if (byte_len)
        *byte_len = write ? length : wc.byte_len;
    return 0;
}

#else /* no <infiniband/verbs.h> at build time */

int cp_rdma_load(char *why, size_t len)
{
    say(why, len, "cowpin was built without the libibverbs headers (Debian: libibverbs-dev; scripts/setup installs it)");
    return -ENOSYS;
}
int cp_rdma_fork_status(void) { return -ENOSYS; }
int cp_rdma_open(const char *device, uint8_t port, int gid_index, struct cp_rdma **out, char *why, size_t len)
{
    (void)device, (void)port, (void)gid_index, (void)out;
    return cp_rdma_load(why, len);
}
void cp_rdma_close(struct cp_rdma *r) { (void)r; }
int cp_rdma_reg_mr(struct cp_rdma *r, void *addr, size_t length, int access, void **mr, uint32_t *lkey, uint32_t *rkey)
{
    (void)r, (void)addr, (void)length, (void)access, (void)mr, (void)lkey, (void)rkey;
    return -ENOSYS;
}
int cp_rdma_dereg_mr(void *mr) { (void)mr; return -ENOSYS; }
int cp_rdma_transfer(struct cp_rdma *r, int write, void *local, uint32_t lkey, uint64_t remote, uint32_t rkey,
                     uint32_t length, int timeout_ms, uint32_t *byte_len, char *why, size_t len)
{
    (void)r, (void)write, (void)local, (void)lkey, (void)remote, (void)rkey, (void)length, (void)timeout_ms, (void)byte_len;
    return cp_rdma_load(why, len);
}

#endif
