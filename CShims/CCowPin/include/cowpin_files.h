/*
 * Files for the file backings: memfd with flags (hugetlb), unnamed files in
 * a directory, and the type of the file system a file lives on. The C
 * library declares these only under _GNU_SOURCE, which Swift's importer does
 * not define. Same conventions as cowpin_shim.h: 0 (or an fd) or -errno.
 */
#ifndef COWPIN_FILES_H
#define COWPIN_FILES_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* memfd_create flags: a hugetlbfs memfd of 2^n bytes per page is
 * CP_MFD_HUGETLB | n << CP_MFD_HUGE_SHIFT. */
enum {
    CP_MFD_HUGETLB = 4,
    CP_MFD_HUGE_SHIFT = 26,
};

/* memfd_create(name, MFD_CLOEXEC | flags): fd or -errno. */
int cp_memfd_create(const char *name, unsigned int flags);

/* An unnamed regular file in directory dir, opened O_RDWR|O_CLOEXEC:
 * O_TMPFILE, or, on a file system without it, mkostemp() then unlink().
 * *unlinked is set to 1 in the second case. fd or -errno. */
int cp_open_tmpfile(const char *dir, int *unlinked);

/* f_type of fstatfs(fd) into *type: 0 or -errno. */
int cp_fstatfs_type(int fd, uint64_t *type);

#ifdef __cplusplus
}
#endif

#endif /* COWPIN_FILES_H */
