import CCowPin
import Glibc
import SystemPackage

/// Reads /proc/PID/pagemap, /proc/kpageflags and /proc/self/smaps.
public enum PageInfo {
    public struct Entry: Equatable, Sendable {
        public var present: Bool
        public var swapped: Bool
        public var exclusive: Bool
        /// nil when the kernel hides PFNs (not CAP_SYS_ADMIN) or the page is absent.
        public var pfn: UInt64?

        public init(raw: UInt64) {
            present = raw & (1 << 63) != 0
            swapped = raw & (1 << 62) != 0
            exclusive = raw & (1 << 56) != 0
            let p = raw & ((1 << 55) - 1)
            pfn = present && p != 0 ? p : nil
        }
    }

    /// The pagemap entry of the page at `address` in process `pid` ("self" when nil).
    public static func entry(pid: Int32? = nil, address: UnsafeRawPointer) -> Entry? {
        let index = UInt(bitPattern: address) / UInt(cp_page_size())
        var raw: UInt64 = 0
        guard let pid else {
            guard ownPagemap >= 0, cp_pread_full(ownPagemap, &raw, 8, Int64(index * 8)) == 8 else { return nil }
            return Entry(raw: raw)
        }
        guard let fd = try? FileDescriptor.open(FilePath("/proc/\(pid)/pagemap"), .readOnly, options: .closeOnExec) else { return nil }
        defer { try? fd.close() }
        guard cp_pread_full(fd.rawValue, &raw, 8, Int64(index * 8)) == 8 else { return nil }
        return Entry(raw: raw)
    }

    /// Bits of /proc/kpageflags (include/uapi/linux/kernel-page-flags.h).
    public static let flagNames: [(bit: Int, name: String)] = [
        (11, "mmap"), (12, "anon"), (13, "swapcache"), (14, "swapbacked"),
        (15, "compound_head"), (16, "compound_tail"), (17, "huge"), (21, "ksm"),
        (22, "thp"), (24, "zero_page"),
    ]

    /// This process's pagemap and /proc/kpageflags, opened once (every case
    /// reads them several times; what an fd may see is fixed when it is opened).
    static let ownPagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
    static let kpageflagsFD = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC)

    public static func kpageflags(pfn: UInt64) -> UInt64? {
        let fd = kpageflagsFD
        guard fd >= 0 else { return nil }
        var raw: UInt64 = 0
        guard cp_pread_full(fd, &raw, 8, Int64(pfn * 8)) == 8 else { return nil }
        return raw
    }

    /// Why a PFN or its flags could not be read: privileges for a user, else
    /// what the kernel answered (a root process under a small memory cgroup
    /// can fail to read them too).
    public static var whyUnreadable: String {
        guard Probe.isRoot else { return "/proc/kpageflags and PFNs need root (CAP_SYS_ADMIN)" }
        if kpageflagsFD < 0 { return "cannot open /proc/kpageflags as root" }
        if ownPagemap < 0 { return "cannot open /proc/self/pagemap as root" }
        var raw: UInt64 = 0
        let r = cp_pread_full(ownPagemap, &raw, 8, 0)
        if r < 0 { return "reading /proc/self/pagemap failed as root: \(Errno.name(Int32(-r)))" }
        let k = cp_pread_full(kpageflagsFD, &raw, 8, 0)
        if k < 0 { return "reading /proc/kpageflags failed as root: \(Errno.name(Int32(-k)))" }
        return "the page's PFN is not present in /proc/self/pagemap (not mapped, or swapped out)"
    }

    public static func flagList(_ raw: UInt64) -> [String] {
        flagNames.filter { raw & (1 << UInt64($0.bit)) != 0 }.map(\.name)
    }

    /// Whether the page at `address` belongs to a transparent huge page
    /// (nil when /proc/kpageflags or the PFN cannot be read).
    public static func isTHP(address: UnsafeRawPointer) -> Bool? {
        guard let pfn = entry(address: address)?.pfn, let flags = kpageflags(pfn: pfn) else { return nil }
        return flags & (1 << 22) != 0
    }

    /// A snapshot of one page for evidence.
    public static func snapshot(step: String, who: String, pid: Int32? = nil, region: Region, page: Int) -> PageSnapshot {
        let e = entry(pid: pid, address: region.address(ofPage: page))
        var flags: [String] = []
        if let e {
            if !e.present { flags.append(e.swapped ? "swapped" : "not present") }
            if e.exclusive { flags.append("exclusive") }
            if let pfn = e.pfn, let raw = kpageflags(pfn: pfn) { flags += flagList(raw) }
        }
        return PageSnapshot(step: step, who: who, page: page, pfn: e?.pfn, flags: flags)
    }

    /// The smaps field `key` (in kB) of the mapping that contains `address`.
    /// How much of `r` is PMD-mapped, in kB: the PAGEMAP_SCAN ioctl where the
    /// kernel has it (6.7+; all of it or nothing), else smaps' AnonHugePages
    /// (reading smaps walks the page tables of the whole process: slow).
    public static func pmdMappedKB(_ r: Region) -> Int? {
        let v = cp_pmd_mapped(r.base, r.size)
        if v >= 0 { return v == 1 ? r.size / 1024 : 0 }
        return smapsValue("AnonHugePages", containing: r.base)
    }

    public static func smapsValue(_ key: String, containing address: UnsafeRawPointer) -> Int? {
        guard let bytes = readBytes("/proc/self/smaps") else { return nil }
        return smapsValue(key, in: bytes, containing: UInt64(UInt(bitPattern: address)))
    }

    /// Parses smaps text: the "Key: N kB" value of the VMA holding `address`.
    public static func smapsValue(_ key: String, in text: [UInt8], containing address: UInt64) -> Int? {
        let key = Array(key.utf8)
        var inside = false
        for line in text.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false) {
            // A VMA header starts with "lo-hi "; field lines start with "Key:".
            if let (lo, hi) = vmaRange(line) {
                if inside { return nil }
                inside = address >= lo && address < hi
                continue
            }
            guard inside, line.count > key.count, line.starts(with: key), line[line.startIndex + key.count] == UInt8(ascii: ":") else { continue }
            let digits = line.dropFirst(key.count + 1).drop { $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\t") }
                .prefix { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
            return Int(String(decoding: digits, as: UTF8.self)) ?? 0
        }
        return nil
    }

    /// The addresses of a smaps VMA header line ("7f00-7f20 rw-p ..."); nil for another line.
    static func vmaRange(_ line: ArraySlice<UInt8>) -> (UInt64, UInt64)? {
        guard let dash = line.firstIndex(of: UInt8(ascii: "-")), dash > line.startIndex,
              let space = line[dash...].firstIndex(of: UInt8(ascii: " ")),
              let lo = UInt64(String(decoding: line[..<dash], as: UTF8.self), radix: 16),
              let hi = UInt64(String(decoding: line[(dash + 1)..<space], as: UTF8.self), radix: 16) else { return nil }
        return (lo, hi)
    }
}
