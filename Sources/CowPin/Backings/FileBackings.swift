import CCowPin
import Glibc
import SystemPackage

/// The files cowpin maps, as kselftest mm/cow.c and mm/gup_longterm.c do: a
/// memfd (shmem), a file on tmpfs, a file on ext4 (a file system that tracks
/// dirty pages for writeback) and a hugetlbfs memfd of each huge page size.
public enum FileKind: Sendable, Equatable {
    case memfd
    case tmpfs
    case ext4
    case memfdHugetlb(kb: Int)

    public static let all: [FileKind] = [.memfd, .tmpfs, .ext4, .memfdHugetlb(kb: 2048), .memfdHugetlb(kb: 1_048_576)]

    /// "memfd", "tmpfs", "ext4", "memfd-hugetlb-2048k".
    public var id: String {
        switch self {
        case .memfd: return "memfd"
        case .tmpfs: return "tmpfs"
        case .ext4: return "ext4"
        case .memfdHugetlb(let kb): return "memfd-hugetlb-\(kb)k"
        }
    }

    var summary: String {
        switch self {
        case .memfd: return "a memfd page"
        case .tmpfs: return "a page of an unnamed file on tmpfs"
        case .ext4: return "a page of an unnamed file on ext4"
        case .memfdHugetlb(let kb): return "a \(kb) KiB hugetlbfs memfd page"
        }
    }

    /// A hugetlbfs file grows the hugetlb pool for its case.
    var needs: SharedNeeds {
        if case .memfdHugetlb(let kb) = self { return Backing.hugetlbNeeds(kb: kb, count: CaseFile.hugePagesPerCase) }
        return .none
    }

    var tags: [String] {
        switch self {
        case .memfd: return ["file", "memfd"]
        case .tmpfs: return ["file", "tmpfs"]
        case .ext4: return ["file", "ext4"]
        case .memfdHugetlb(let kb): return ["file", "memfd", "hugetlb"] + (kb >= 1_048_576 ? ["slow"] : [])
        }
    }

    /// The file system the file must be on (statfs f_type).
    var fileSystem: UInt64 {
        switch self {
        case .memfd, .tmpfs: return FileSystem.tmpfs
        case .ext4: return FileSystem.ext4
        case .memfdHugetlb: return FileSystem.hugetlbfs
        }
    }
}

/// File system magic numbers (statfs f_type, <linux/magic.h>).
public enum FileSystem {
    public static let tmpfs: UInt64 = 0x0102_1994
    public static let ext4: UInt64 = 0xEF53
    public static let hugetlbfs: UInt64 = 0x9584_58F6
    public static let xfs: UInt64 = 0x5846_5342
    public static let btrfs: UInt64 = 0x9123_683E

    public static func name(_ type: UInt64) -> String {
        switch type {
        case tmpfs: return "tmpfs"
        case ext4: return "ext4"
        case hugetlbfs: return "hugetlbfs"
        case xfs: return "xfs"
        case btrfs: return "btrfs"
        default: return "f_type 0x\(String(type, radix: 16))"
        }
    }

    /// The type of the file system `fd` lives on.
    static func of(_ fd: Int32) throws -> UInt64 {
        var t: UInt64 = 0
        try check("fstatfs", cp_fstatfs_type(fd, &t))
        return t
    }

    /// The type of the mount `fd` lives on, as /proc/self/mountinfo names it
    /// ("ext4", "9p"): statfs() is not enough, since 9p reports the f_type of
    /// the file system it exports. nil for mounts outside this namespace
    /// (memfd) or when /proc cannot tell.
    static func mountType(_ fd: Int32) -> String? {
        guard let info = readFile("/proc/self/fdinfo/\(fd)"),
              let line = info.split(separator: "\n").first(where: { $0.hasPrefix("mnt_id:") }),
              let id = Int(String(line.dropFirst("mnt_id:".count)).trimmed) else { return nil }
        for mount in (readFile("/proc/self/mountinfo") ?? "").split(separator: "\n") {
            let halves = mount.split(separator: " - ", maxSplits: 1)
            guard halves.count == 2, halves[0].split(separator: " ").first == Substring(String(id)) else { continue }
            return halves[1].split(separator: " ").first.map(String.init)
        }
        return nil
    }
}

/// One page (or one huge page) of a file holding the case's original
/// content. The descriptor is closed when the case ends.
struct CaseFile {
    let fd: Int32
    let size: Int
    let kind: FileKind
    /// What and where the file is, for evidence: "tmpfs file in /dev/shm (O_TMPFILE)".
    let origin: String

    /// Huge pages a file backing reserves: the file's page, and the private
    /// copy a write to a MAP_PRIVATE mapping makes.
    static let hugePagesPerCase = 2

    static func create(_ kind: FileKind, ctx: CaseContext) throws -> CaseFile {
        let page = Int(cp_page_size())
        let fd: Int32, size: Int, origin: String
        switch kind {
        case .memfd:
            fd = try check("memfd_create", cp_memfd_create("cowpin-file", 0))
            (size, origin) = (page, "memfd")
        case .tmpfs:
            (fd, origin) = try openUnnamed(on: FileSystem.tmpfs, among: ["/dev/shm", "/tmp", "/run"])
            size = page
        case .ext4:
            var dirs = ["/var/tmp", "/tmp"]
            if let env = getenv("COWPIN_EXT4_DIR") { dirs.insert(String(cString: env), at: 0) }
            var cwd = [CChar](repeating: 0, count: 4096)
            if getcwd(&cwd, cwd.count) != nil { dirs.append(String(cString: cwd)) }
            (fd, origin) = try openUnnamed(on: FileSystem.ext4, among: dirs)
            size = page
        case .memfdHugetlb(let kb):
            try Backing.reserveHugePages(kb: kb, count: hugePagesPerCase, ctx: ctx)
            size = kb * 1024
            let flags = UInt32(CP_MFD_HUGETLB) | UInt32(size.trailingZeroBitCount) << UInt32(CP_MFD_HUGE_SHIFT)
            let r = cp_memfd_create("cowpin-file", flags)
            if r == -EINVAL { throw CaseSkip("memfd_create(MFD_HUGETLB, \(kb) KiB) is not supported (EINVAL; needs 4.14)") }
            fd = try check("memfd_create(MFD_HUGETLB, \(kb) KiB)", r)
            origin = "hugetlbfs memfd (\(kb) KiB pages)"
        }
        ctx.onCleanup { cp_close(fd) }
        let found = try FileSystem.of(fd)
        guard found == kind.fileSystem else {
            throw CaseSkip("\(origin) is on \(FileSystem.name(found)), not \(FileSystem.name(kind.fileSystem))")
        }
        let file = CaseFile(fd: fd, size: size, kind: kind, origin: origin)
        try file.write(ctx.original)
        return file
    }

    /// An unnamed file in the first of `dirs` on file system `fs` that takes one.
    static func openUnnamed(on fs: UInt64, among dirs: [String]) throws -> (Int32, String) {
        let want = FileSystem.name(fs)
        var seen: [String] = []
        for dir in dirs {
            let dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
            guard dfd >= 0 else {
                seen.append("\(dir): \(Errno.name(errno))")
                continue
            }
            let t = try? FileSystem.of(dfd)
            let mount = FileSystem.mountType(dfd)
            close(dfd)
            let name = mount ?? t.map(FileSystem.name) ?? "?"
            guard t == fs, mount == nil || mount == want else {
                seen.append("\(dir): \(name)" + (t == fs ? " (statfs reports \(want))" : ""))
                continue
            }
            var unlinked: Int32 = 0
            let fd = cp_open_tmpfile(dir, &unlinked)
            guard fd >= 0 else {
                seen.append("\(dir): \(name), but no file can be made there (\(Errno.name(-fd)))")
                continue
            }
            return (fd, "\(want) file in \(dir) (\(unlinked != 0 ? "mkostemp, unlinked" : "O_TMPFILE"))")
        }
        throw CaseSkip("no \(want) directory found among \(seen.joined(separator: ", "))")
    }

    /// Writes `content` as the file's data: pwrite(), or through a MAP_SHARED
    /// mapping on hugetlbfs (which has no write()).
    func write(_ content: Content) throws {
        if case .memfdHugetlb = kind {
            try check("ftruncate(\(origin))", ftruncate(fd, off_t(size)) == 0 ? 0 : -errno)
            let shared = try map(shared: true, prot: Int32(CP_PROT_READ_WRITE), what: "MAP_SHARED, to write it")
            shared.fill(content)
            shared.release()
            return
        }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 8)
        defer { buffer.deallocate() }
        content.materialize(into: buffer)
        let n = try check("pwrite(\(origin))", cp_pwrite_full(fd, buffer.baseAddress, size, 0))
        guard n == size else { throw HarnessError("pwrite(\(origin)) wrote \(n) of \(size) bytes") }
    }

    /// mmap() of the whole file; released by the caller (or with the case's region).
    func map(shared: Bool, prot: Int32, what: String) throws -> Region {
        var err: Int32 = 0
        let how = shared ? "MAP_SHARED" : "MAP_PRIVATE"
        guard let p = cp_mmap_fd(size, prot, shared ? 1 : 0, fd, 0, &err) else {
            if err == ENOMEM, case .memfdHugetlb(let kb) = kind {
                throw CaseSkip("no free \(kb) KiB huge page for mmap(\(how)) of the hugetlbfs memfd (the pool is used up)")
            }
            throw SyscallError("mmap(\(origin), \(how))", errno: err)
        }
        let r = Region(base: p, size: size, origin: "\(origin), \(what)")
        r.file = fd
        return r
    }
}

extension Backing {
    /// How a file backing maps its file and touches it first.
    enum FileAccess {
        /// MAP_PRIVATE, read: the pagecache page itself is mapped (R/O).
        case privateRead
        /// MAP_SHARED, written: the pagecache page is mapped R/W and dirty.
        case sharedWrite
        /// MAP_PRIVATE, written: the write fault made an anonymous copy.
        case privateWrite
    }

    /// One page (or huge page) of a file of `kind`, holding the case's
    /// original content, mapped and touched as `access` says; verified in
    /// /proc/kpageflags where it can be read (root): anonymous or not, and a
    /// hugetlb page on hugetlbfs. The region's `file` is the open file.
    static func file(_ kind: FileKind, _ access: FileAccess) -> Backing {
        let id: String, summary: String, tags: [String]
        switch access {
        case .privateRead:
            id = "\(kind.id)-private"
            summary = "\(kind.summary) mapped MAP_PRIVATE, read before any write (pagecache)"
            tags = kind.tags + ["pagecache"]
        case .sharedWrite:
            id = kind.id
            summary = "\(kind.summary) mapped MAP_SHARED and written"
            tags = kind.tags + ["shared"]
        case .privateWrite:
            id = kind.id
            summary = "\(kind.summary) mapped MAP_PRIVATE and written (an anonymous copy)"
            tags = kind.tags + ["private"]
        }
        return Backing(id: id, summary: summary, tags: tags, needs: kind.needs) { ctx in
            let f = try CaseFile.create(kind, ctx: ctx)
            let r = try f.map(shared: access == .sharedWrite, prot: Int32(CP_PROT_READ_WRITE),
                              what: access == .sharedWrite ? "MAP_SHARED" : "MAP_PRIVATE")
            switch access {
            case .privateRead: cp_touch_read(r.base, r.size, r.pageSize)
            case .sharedWrite, .privateWrite: r.fill(ctx.original)
            }
            try requireAnonymous(access == .privateWrite, r, kind: kind, after: access == .privateRead ? "the read fault" : "the write fault")
            return r
        }
    }

    /// Skips unless kpageflags shows the first page anonymous (or not), and
    /// a hugetlb page for a hugetlbfs file. Without root (no PFNs, no
    /// kpageflags) the mapping is taken as the kernel documents it.
    static func requireAnonymous(_ anonymous: Bool, _ r: Region, kind: FileKind, after step: String) throws {
        guard let pfn = PageInfo.entry(address: r.base)?.pfn, let raw = PageInfo.kpageflags(pfn: pfn) else { return }
        let flags = PageInfo.flagList(raw)
        if flags.contains("anon") != anonymous {
            throw CaseSkip("\(step) mapped \(anonymous ? "the pagecache page, not an anonymous copy" : "an anonymous page, not the pagecache page") (page flags: \(flags.joined(separator: ",")))")
        }
        if case .memfdHugetlb = kind, !flags.contains("huge") {
            throw CaseSkip("\(step) mapped no hugetlb page (page flags: \(flags.joined(separator: ",")))")
        }
    }

    /// A file page in a MAP_PRIVATE mapping, read before any write: the
    /// pagecache page itself is mapped (R/O), not an anonymous copy.
    public static let memfdPrivate = file(.memfd, .privateRead)
}
