/// `cowpin probe` as text.
public enum ProbeText {
    public static func render(_ p: Probe) -> String {
        func mb(_ b: UInt64?) -> String { b.map { "\($0 / 1024) KiB" } ?? "unlimited" }
        var l: [String] = []
        l.append("kernel:        Linux \(p.kernel.release) \(p.kernel.machine) (\(p.kernel.version))")
        l.append("privileges:    euid \(p.privileges.euid), CAP_SYS_ADMIN \(p.privileges.capSysAdmin ? "yes" : "no"), CAP_IPC_LOCK \(p.privileges.capIpcLock ? "yes" : "no")")
        l.append("memlock:       soft \(mb(p.memlock.soft)), hard \(mb(p.memlock.hard))")
        l.append("page size:     \(p.pageSize)")
        l.append("io_uring:      \(p.ioUring.usable ? "usable" : "unusable") (\(p.ioUring.detail)\(p.ioUring.disabledSysctl.map { "; io_uring_disabled=\($0)" } ?? ""))")
        if p.thp.available {
            l.append("THP:           enabled=\(p.thp.enabled ?? "?") defrag=\(p.thp.defrag ?? "?") pmd=\(p.thp.pmdSize.map { "\($0 / 1024) KiB" } ?? "?") use_zero_page=\(p.thp.useZeroPage.map { $0 ? "1" : "0" } ?? "?")")
            if !p.thp.sizes.isEmpty {
                l.append("mTHP sizes:    " + p.thp.sizes.map { "\($0.sizeKB)kB=\($0.enabled)" }.joined(separator: " "))
            }
        } else {
            l.append("THP:           not available")
        }
        l.append("hugetlb:       " + (p.hugetlb.isEmpty ? "none" : p.hugetlb.map { "\($0.sizeKB)kB total=\($0.total) free=\($0.free)" }.joined(separator: "; ")))
        l.append("swap:          " + (p.swap.isEmpty ? "none" : p.swap.map { "\($0.name) (\($0.type), \($0.sizeKB) KiB)" }.joined(separator: "; ")))
        l.append("FUSE:          \(p.fuse.available ? "yes" : "no") (\(p.fuse.detail))")
        l.append("VFIO:          container \(p.vfio.container ? "yes" : "no"), groups [\(p.vfio.groups.joined(separator: ", "))], vfio-pci devices [\(p.vfio.devices.joined(separator: ", "))], DMA engine: \(p.vfio.dmaDevice ?? "none")")
        l.append("gup_test:      \(p.gupTest.available ? "yes" : "no") (\(p.gupTest.detail))")
        l.append("KSM:           \(p.ksm.available ? "yes" : "no") (\(p.ksm.detail))")
        if let r = p.rdma {
            l.append("RDMA:          \(r.port == nil ? "no" : "yes") (\(r.detail))\(r.forkStatus.map { "; rdma-core ibv_is_fork_initialized() = \($0)" } ?? "")")
        }
        l.append("userfaultfd:   \(p.userfaultfd.available ? "yes" : "no") (\(p.userfaultfd.detail))")
        return l.joined(separator: "\n")
    }
}
