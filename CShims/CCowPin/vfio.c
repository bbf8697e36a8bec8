/* VFIO type1: container, group, device and DMA mappings. */
#include "cowpin_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int cp_vfio_open_container(void)
{
    int fd = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    if (ioctl(fd, VFIO_GET_API_VERSION) != VFIO_API_VERSION ||
        (!ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) && !ioctl(fd, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU))) {
        close(fd);
        return -ENOTSUP;
    }
    return fd;
}

int cp_vfio_open_group(int container, const char *path)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct vfio_group_status status = {.argsz = sizeof(status)};
    if (ioctl(fd, VFIO_GROUP_GET_STATUS, &status) < 0 || !(status.flags & VFIO_GROUP_FLAGS_VIABLE)) {
        int err = errno ? errno : EBUSY;
        close(fd);
        return -err;
    }
    if (ioctl(fd, VFIO_GROUP_SET_CONTAINER, &container) < 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    int type = ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) ? VFIO_TYPE1v2_IOMMU : VFIO_TYPE1_IOMMU;
    if (ioctl(container, VFIO_SET_IOMMU, type) < 0) {
        int err = errno;
        close(fd);
        return -err;
    }
    return fd;
}

int cp_vfio_device_fd(int group, const char *bdf)
{
    int fd = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
    return fd < 0 ? -errno : fd;
}

int cp_vfio_region(int device, uint32_t index, uint64_t *offset, uint64_t *size)
{
    struct vfio_region_info info = {.argsz = sizeof(info), .index = index};
    if (ioctl(device, VFIO_DEVICE_GET_REGION_INFO, &info) < 0)
        return -errno;
    *offset = info.offset;
    *size = info.size;
    return 0;
}

int cp_vfio_map_dma(int container, void *vaddr, uint64_t iova, uint64_t size, int writable)
{
    struct vfio_iommu_type1_dma_map map = {
        .argsz = sizeof(map),
        .flags = VFIO_DMA_MAP_FLAG_READ | (writable ? VFIO_DMA_MAP_FLAG_WRITE : 0),
        .vaddr = (uint64_t)(uintptr_t)vaddr,
        .iova = iova,
        .size = size,
    };
    return ioctl(container, VFIO_IOMMU_MAP_DMA, &map) < 0 ? -errno : 0;
}

int cp_vfio_unmap_dma(int container, uint64_t iova, uint64_t size)
{
    struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof(unmap), .iova = iova, .size = size};
    return ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap) < 0 ? -errno : 0;
}
