import CCowPin
import CZlib
import Glibc

/// What the running kernel offers cowpin, read from /proc, /sys and a few syscalls.
public struct Probe: Codable, Sendable, Equatable {
    public struct Kernel: Codable, Sendable, Equatable {
        public var release: String
        public var version: String
        public var machine: String
        public init(release: String, version: String, machine: String) {
            self.release = release
            self.version = version
            self.machine = machine
        }
    }

    public struct Privileges: Codable, Sendable, Equatable {
        public var euid: UInt32
        public var capSysAdmin: Bool
        public var capIpcLock: Bool
    }

    public struct Limit: Codable, Sendable, Equatable {
        /// nil: unlimited.
        public var soft: UInt64?
        public var hard: UInt64?
    }

    public struct IoUringInfo: Codable, Sendable, Equatable {
        public var usable: Bool
        /// /proc/sys/kernel/io_uring_disabled (0, 1, 2), nil when absent.
        public var disabledSysctl: Int?
        public var detail: String
    }

    public struct MTHPSize: Codable, Sendable, Equatable {
        public var sizeKB: Int
        /// always, inherit, madvise or never.
        public var enabled: String
    }

    public struct THPInfo: Codable, Sendable, Equatable {
        public var available: Bool
        public var enabled: String?
        public var defrag: String?
        public var pmdSize: Int?
        public var useZeroPage: Bool?
        public var sizes: [MTHPSize]

        /// Why MADV_HUGEPAGE cannot give a PMD THP here, or nil.
        public var pmdUnavailableReason: String? {
            guard available, let pmd = pmdSize else { return "no THP support (/sys/kernel/mm/transparent_hugepage missing)" }
            let perSize = sizes.first { $0.sizeKB * 1024 == pmd }?.enabled ?? "inherit"
            if perSize == "never" { return "PMD-sized THP disabled (hugepages-\(pmd / 1024)kB/enabled=never)" }
            if perSize == "inherit" && enabled == "never" { return "THP disabled (transparent_hugepage/enabled=never)" }
            return nil
        }
    }

    public struct HugetlbPool: Codable, Sendable, Equatable {
        public var sizeKB: Int
        public var total: Int
        public var free: Int
        public var reserved: Int
        public var surplus: Int
    }

    public struct SwapDevice: Codable, Sendable, Equatable {
        public var name: String
        public var type: String
        public var sizeKB: Int
        public var usedKB: Int
        public var priority: Int
        public init(name: String, type: String, sizeKB: Int, usedKB: Int, priority: Int) {
            self.name = name
            self.type = type
            self.sizeKB = sizeKB
            self.usedKB = usedKB
            self.priority = priority
        }
    }

    public struct Feature: Codable, Sendable, Equatable {
        public var available: Bool
        public var detail: String
    }

    public struct VFIOInfo: Codable, Sendable, Equatable {
        public var container: Bool
        public var groups: [String]
        /// PCI devices bound to vfio-pci.
        public var devices: [String]
        /// One of them with a DMA engine cowpin can drive ("0000:00:02.0 (QEMU edu)").
        public var dmaDevice: String?
    }

    public var kernel: Kernel
    public var privileges: Privileges
    public var memlock: Limit
    public var pageSize: Int
    public var ioUring: IoUringInfo
    public var thp: THPInfo
    public var hugetlb: [HugetlbPool]
    public var swap: [SwapDevice]
    public var fuse: Feature
    public var vfio: VFIOInfo
    public var gupTest: Feature
    public var ksm: Feature
    public var userfaultfd: Feature
    /// RDMA devices and rdma-core's fork claim (nil in a probe from an older cowpin).
    public var rdma: RDMAInfo?

    public static var isRoot: Bool { geteuid() == 0 }

    public static func memlockLimit() -> Limit {
        var r = rlimit()
        guard getrlimit(__rlimit_resource_t(__RLIMIT_MEMLOCK.rawValue), &r) == 0 else { return Limit(soft: nil, hard: nil) }
        let inf = rlim_t.max  // RLIM_INFINITY
        return Limit(soft: r.rlim_cur == inf ? nil : UInt64(r.rlim_cur), hard: r.rlim_max == inf ? nil : UInt64(r.rlim_max))
    }

    /// Probes the running kernel.
    public static func current() -> Probe {
        var u = utsname()
        uname(&u)
        func field<T>(_ v: T) -> String {
            withUnsafeBytes(of: v) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        }
        let status = readFile("/proc/self/status") ?? ""
        let caps = ProbeParsing.capEff(status) ?? 0
        return Probe(
            kernel: Kernel(release: field(u.release), version: field(u.version), machine: field(u.machine)),
            privileges: Privileges(euid: geteuid(), capSysAdmin: caps & (1 << 21) != 0, capIpcLock: caps & (1 << 14) != 0),
            memlock: memlockLimit(),
            pageSize: Int(cp_page_size()),
            ioUring: probeIoUring(),
            thp: probeTHP(),
            hugetlb: probeHugetlb(),
            swap: ProbeParsing.swaps(readFile("/proc/swaps") ?? ""),
            fuse: probeFuse(),
            vfio: probeVFIO(),
            gupTest: probeGupTest(),
            ksm: Feature(available: access("/sys/kernel/mm/ksm/run", F_OK) == 0,
                         detail: access("/sys/kernel/mm/ksm/run", F_OK) == 0 ? "run=\(trimmed("/sys/kernel/mm/ksm/run") ?? "?")" : "no /sys/kernel/mm/ksm (CONFIG_KSM not set)"),
            userfaultfd: Feature(available: access("/proc/sys/vm/unprivileged_userfaultfd", F_OK) == 0 || access("/dev/userfaultfd", F_OK) == 0,
                                 detail: access("/dev/userfaultfd", F_OK) == 0 ? "/dev/userfaultfd present" : "syscall only"),
            rdma: RDMA.probe()
        )
    }

    static func trimmed(_ path: String) -> String? {
        readFile(path).map { $0.trimmed }
    }

    static func probeIoUring() -> IoUringInfo {
        let sysctl = trimmed("/proc/sys/kernel/io_uring_disabled").flatMap { Int($0) }
        do {
            _ = try IoUring(entries: 1)
            return IoUringInfo(usable: true, disabledSysctl: sysctl, detail: "io_uring_setup works")
        } catch {
            var detail = "io_uring_setup failed: \(error)"
            if let s = sysctl, s > 0 { detail += " (kernel.io_uring_disabled=\(s))" }
            return IoUringInfo(usable: false, disabledSysctl: sysctl, detail: detail)
        }
    }

    static func probeTHP() -> THPInfo {
        let dir = "/sys/kernel/mm/transparent_hugepage"
        guard access(dir, F_OK) == 0 else {
            return THPInfo(available: false, enabled: nil, defrag: nil, pmdSize: nil, useZeroPage: nil, sizes: [])
        }
        let sizes = listDirectory(dir).compactMap { name -> MTHPSize? in
            // Sizes without an "enabled" file exist for shmem only.
            guard let kb = ProbeParsing.hugepagesDirSizeKB(name),
                  let mode = trimmed("\(dir)/\(name)/enabled").flatMap(ProbeParsing.bracketed) else { return nil }
            return MTHPSize(sizeKB: kb, enabled: mode)
        }.sorted { $0.sizeKB < $1.sizeKB }
        return THPInfo(
            available: true,
            enabled: trimmed("\(dir)/enabled").flatMap(ProbeParsing.bracketed),
            defrag: trimmed("\(dir)/defrag").flatMap(ProbeParsing.bracketed),
            pmdSize: trimmed("\(dir)/hpage_pmd_size").flatMap { Int($0) },
            useZeroPage: trimmed("\(dir)/use_zero_page").map { $0 == "1" },
            sizes: sizes)
    }

    static func probeHugetlb() -> [HugetlbPool] {
        let dir = "/sys/kernel/mm/hugepages"
        return listDirectory(dir).compactMap { name -> HugetlbPool? in
            guard let kb = ProbeParsing.hugepagesDirSizeKB(name) else { return nil }
            func n(_ f: String) -> Int { trimmed("\(dir)/\(name)/\(f)").flatMap { Int($0) } ?? 0 }
            return HugetlbPool(sizeKB: kb, total: n("nr_hugepages"), free: n("free_hugepages"),
                               reserved: n("resv_hugepages"), surplus: n("surplus_hugepages"))
        }.sorted { $0.sizeKB < $1.sizeKB }
    }

    static func probeFuse() -> Feature {
        let dev = access("/dev/fuse", F_OK) == 0
        let fs = ProbeParsing.filesystems(readFile("/proc/filesystems") ?? "").contains("fuse")
        let detail = fs ? (dev ? "fuse filesystem and /dev/fuse present" : "fuse filesystem present, /dev/fuse missing")
                        : "fuse not in /proc/filesystems (CONFIG_FUSE_FS not set or module not loaded)"
        return Feature(available: dev && fs, detail: detail)
    }

    static func probeVFIO() -> VFIOInfo {
        let groups = listDirectory("/dev/vfio").filter { $0 != "vfio" }.sorted()
        let devices = listDirectory("/sys/bus/pci/drivers/vfio-pci").filter { $0.contains(":") }.sorted()
        let dma = DMADevices.find().map { "\($0.bdf) (\($0.driver.name))" }
        return VFIOInfo(container: access("/dev/vfio/vfio", F_OK) == 0, groups: groups, devices: devices, dmaDevice: dma)
    }

    static func probeGupTest() -> Feature {
        if access(GupTestPin.path, F_OK) == 0 {
            return Feature(available: true, detail: "\(GupTestPin.path) present")
        }
        let mounts = readFile("/proc/mounts") ?? ""
        if ProbeParsing.isMounted(mounts, type: "debugfs", at: "/sys/kernel/debug") {
            return Feature(available: false, detail: "gup_test unavailable: kernel built without CONFIG_GUP_TEST (debugfs has no gup_test)")
        }
        // debugfs is not mounted: the build configuration tells whether mounting it would help.
        if let config = KernelConfig.current(keys: ["CONFIG_GUP_TEST"]), config.values["CONFIG_GUP_TEST"] == nil {
            return Feature(available: false, detail: "gup_test unavailable: CONFIG_GUP_TEST is not set (\(config.source))")
        }
        return Feature(available: false, detail: "gup_test unavailable: debugfs is not mounted on /sys/kernel/debug")
    }
}

/// Pure parsers for the files the probe reads (unit-tested on fixed text).
public enum ProbeParsing {
    /// "always [madvise] never" -> "madvise".
    public static func bracketed(_ s: String) -> String? {
        guard let open = s.firstIndex(of: "["), let close = s[open...].firstIndex(of: "]") else { return nil }
        return String(s[s.index(after: open)..<close])
    }

    /// "hugepages-2048kB" -> 2048.
    public static func hugepagesDirSizeKB(_ name: String) -> Int? {
        guard name.hasPrefix("hugepages-"), name.hasSuffix("kB") else { return nil }
        return Int(name.dropFirst("hugepages-".count).dropLast(2))
    }

    /// CapEff from /proc/PID/status.
    public static func capEff(_ status: String) -> UInt64? {
        for line in status.split(separator: "\n") where line.hasPrefix("CapEff:") {
            return UInt64(String(line.dropFirst("CapEff:".count)).trimmed, radix: 16)
        }
        return nil
    }

    /// /proc/swaps.
    public static func swaps(_ text: String) -> [Probe.SwapDevice] {
        text.split(separator: "\n").dropFirst().compactMap { line in
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard f.count >= 5, let size = Int(f[2]), let used = Int(f[3]), let prio = Int(f[4]) else { return nil }
            return Probe.SwapDevice(name: String(f[0]), type: String(f[1]), sizeKB: size, usedKB: used, priority: prio)
        }
    }

    /// File system names in /proc/filesystems ("nodev\tfuse" -> "fuse").
    public static func filesystems(_ text: String) -> Set<String> {
        Set(text.split(separator: "\n").compactMap { $0.split(separator: "\t").last.map { String($0).trimmed } })
    }

    /// Whether /proc/mounts lists a file system of `type` mounted at `path`.
    public static func isMounted(_ mounts: String, type: String, at path: String) -> Bool {
        mounts.split(separator: "\n").contains { line in
            let f = line.split(separator: " ")
            return f.count >= 3 && f[1] == path && f[2] == type
        }
    }
}

/// The running kernel's build configuration, from /proc/config.gz or /boot.
public struct KernelConfig: Sendable {
    public var source: String
    /// CONFIG_X -> "y", "m", "\"string\"", ... (options that are not set are absent).
    public var values: [String: String]

    /// The configuration, or only `keys` of it (a config has thousands of lines).
    public static func current(keys: Set<String>? = nil) -> KernelConfig? {
        if let text = readGzip("/proc/config.gz", limit: 1 << 20), !text.isEmpty {
            return KernelConfig(source: "/proc/config.gz", values: parse(String(decoding: text, as: UTF8.self), keys: keys))
        }
        var u = utsname()
        uname(&u)
        let release = withUnsafeBytes(of: u.release) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        let path = "/boot/config-\(release)"
        return readFile(path).map { KernelConfig(source: path, values: parse($0, keys: keys)) }
    }

    public static func parse(_ text: String, keys: Set<String>? = nil) -> [String: String] {
        var out: [String: String] = [:]
        let wanted = keys.map { $0.map { Array(($0 + "=").utf8) } }
        // Bytes, not Characters.
        for line in text.utf8.split(separator: UInt8(ascii: "\n")) where line.starts(with: "CONFIG_".utf8) {
            if let wanted, !wanted.contains(where: { line.starts(with: $0) }) { continue }
            guard let eq = line.firstIndex(of: UInt8(ascii: "=")) else { continue }
            out[String(decoding: line[..<eq], as: UTF8.self)] = String(decoding: line[line.index(after: eq)...], as: UTF8.self)
        }
        return out
    }
}

extension String {
    /// Without leading and trailing white space.
    var trimmed: String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\n" || $0 == "\r" }
        guard let first = firstIndex(where: { !isSpace($0) }), let last = lastIndex(where: { !isSpace($0) }) else { return "" }
        return String(self[first...last])
    }
}
