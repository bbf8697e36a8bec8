/* Files for the file backings (see cowpin_files.h). */
#include "cowpin_files.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <unistd.h>

int cp_memfd_create(const char *name, unsigned int flags)
{
    int fd = memfd_create(name, MFD_CLOEXEC | flags);
    return fd < 0 ? -errno : fd;
}

int cp_open_tmpfile(const char *dir, int *unlinked)
{
    *unlinked = 0;
    int fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd >= 0)
        return fd;
    /* EOPNOTSUPP: the file system has no O_TMPFILE; EISDIR/EINVAL: the
     * kernel or C library predates it. Anything else is final. */
    if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL)
        return -errno;
    char path[4096];
    int n = snprintf(path, sizeof(path), "%s/cowpin-file-XXXXXX", dir);
    if (n < 0 || (size_t)n >= sizeof(path))
        return -ENAMETOOLONG;
    fd = mkostemp(path, O_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (unlink(path)) {
        int err = errno;
        close(fd);
        return -err;
    }
    *unlinked = 1;
    return fd;
}

int cp_fstatfs_type(int fd, uint64_t *type)
{
    struct statfs s;
    if (fstatfs(fd, &s))
        return -errno;
    *type = (uint64_t)(unsigned long)s.f_type & 0xffffffffu;
    return 0;
}
