import CCowPin
import Glibc

/// Long-term R/W pins of file mappings, as kselftest mm/gup_longterm.c checks
/// them, with io_uring fixed buffers (IORING_REGISTER_BUFFERS is always
/// FOLL_WRITE|FOLL_PIN|FOLL_LONGTERM). A pin of a shared mapping on a file
/// system that writes dirty pages back (ext4, xfs, btrfs) would let the
/// device write a page after writeback cleaned it: upstream refuses it. The
/// case records whether this kernel took the pin or refused it, and compares
/// that with what upstream intends for the kernel's version.
public enum FilePinningCases {
    public static let scenarios: [Scenario] = [scenario(shared: true), scenario(shared: false)]

    /// What upstream intends io_uring to answer for a fixed buffer in a file mapping.
    public struct Intent: Equatable, Sendable {
        public var taken: Bool
        /// The errno of the refusal (nil when taken).
        public var errno: Int32?
        /// The upstream rule, phrased to follow "taken, but" / "refused (E) although".
        public var because: String

        public var answer: String { taken ? "the pin taken" : "the pin refused (\(Errno.name(errno ?? 0)))" }
    }

    static let gupCommit = "\"mm/gup: disallow FOLL_LONGTERM GUP-nonfast writing to file-backed mappings\""
    static let uringCommit = "\"io_uring: rsrc: delegate VMA file-backed check to GUP\""

    /// Upstream's rule for `release`: since 6.5 (the two commits above) io_uring
    /// leaves the check to GUP, which refuses R/W long-term pins of shared
    /// mappings on file systems that need dirty tracking (EFAULT) and pins the
    /// anonymous copy in a private mapping. Before 6.5 io_uring refused every
    /// file mapping (EOPNOTSUPP), private or shared, except hugetlbfs and,
    /// since 5.14, shmem (tmpfs, memfd).
    public static func intent(release: String, fileSystem fs: UInt64, shared: Bool) -> Intent {
        // A release that does not parse: the newest rule.
        let v = KernelVersion(release) ?? KernelVersion("999.0")!
        let name = FileSystem.name(fs)
        let mapping = shared ? "shared" : "private"
        if fs == FileSystem.hugetlbfs {
            return Intent(taken: true, errno: nil,
                          because: "upstream io_uring allows buffers in hugetlbfs mappings on every kernel (hugetlbfs needs no dirty tracking)")
        }
        let shmem = fs == FileSystem.tmpfs
        if v >= KernelVersion("6.5")! {
            if !shared {
                return Intent(taken: true, errno: nil,
                              because: "upstream allows R/W long-term pins of private \(name) mappings since 6.5 (the write fault makes an anonymous copy; \(uringCommit))")
            }
            if shmem {
                return Intent(taken: true, errno: nil,
                              because: "upstream allows R/W long-term pins of shared \(name) mappings (shmem needs no dirty tracking; since 6.5 GUP decides: \(gupCommit))")
            }
            return Intent(taken: false, errno: EFAULT,
                          because: "upstream refuses R/W long-term pins of \(name) shared mappings since 6.5 with EFAULT (writeback of a pinned page; \(gupCommit))")
        }
        if shmem && v >= KernelVersion("5.14")! {
            return Intent(taken: true, errno: nil,
                          because: "upstream io_uring allows buffers in \(mapping) shmem (tmpfs, memfd) mappings since 5.14")
        }
        return Intent(taken: false, errno: EOPNOTSUPP,
                      because: shmem
                          ? "upstream io_uring refuses buffers in every file mapping but hugetlbfs before 5.14 (EOPNOTSUPP; shmem allowed since 5.14)"
                          : "upstream io_uring refuses buffers in \(mapping) \(name) mappings before 6.5 with EOPNOTSUPP (\(shared ? "GUP refuses them with EFAULT since 6.5" : "allowed since 6.5: \(uringCommit)"))")
    }

    static func scenario(shared: Bool) -> Scenario {
        let mapping = shared ? "shared" : "private"
        let how = shared ? "MAP_SHARED" : "MAP_PRIVATE"
        return Scenario(
            id: "longterm-file/iouring-fixed-\(mapping)",
            summary: "io_uring fixed buffer (FOLL_WRITE|FOLL_PIN|FOLL_LONGTERM) in a \(how) file mapping: taken or refused as upstream intends for this kernel",
            steps: ["create the file (one page, or one huge page) and mmap() it \(how)",
                    shared ? "fault it in by writing (the pagecache page, dirty)" : "fault it in by writing (an anonymous copy of the pagecache page)",
                    "IORING_REGISTER_BUFFERS: record whether the kernel takes the pin or refuses it (errno)",
                    "compare with upstream's rule for this kernel version: since 6.5 a private mapping is always pinnable, a shared one only on tmpfs/shmem and hugetlbfs (ext4: EFAULT); before 6.5 io_uring refused file mappings other than shmem (5.14) and hugetlbfs (EOPNOTSUPP)",
                    "if taken: the parent writes 0xff; read through the pin (WRITE_FIXED): must show the write",
                    shared ? "if taken: the file (pread) must show the write" : "if taken: the file (pread) must still hold the original content"],
            tags: ["longterm-file", "iouring-fixed", "longterm-pin", "rw-pin"],
            backings: FileKind.all.map { Backing.file($0, shared ? .sharedWrite : .privateWrite) },
            requires: { IoUringFixedPin().unavailable($0) }
        ) { ctx in
            try run(ctx, shared: shared)
        }
    }

    static func run(_ ctx: CaseContext, shared: Bool) throws {
        let region = ctx.region!
        guard let fd = region.file else { throw HarnessError("the backing mapped no file") }
        let fs = try FileSystem.of(fd)
        guard [FileSystem.tmpfs, FileSystem.hugetlbfs, FileSystem.ext4, FileSystem.xfs, FileSystem.btrfs].contains(fs) else {
            throw CaseSkip("no upstream rule for R/W long-term pins on \(FileSystem.name(fs))")
        }
        let release = ctx.probe.kernel.release
        let intent = intent(release: release, fileSystem: fs, shared: shared)
        ctx.notePages("before the pin")

        let ring = try IoUring(entries: 4)
        let refused = try ring.tryRegister(region)
        ctx.note(refused.map { "pin refused: \(Errno.name($0))" } ?? "pin taken")
        ctx.note("upstream intends on \(release): \(intent.answer); \(intent.because)")

        let view = "io_uring IORING_REGISTER_BUFFERS of the \(shared ? "MAP_SHARED" : "MAP_PRIVATE") \(FileSystem.name(fs)) mapping"
        var differs: String?
        switch (refused, intent.taken) {
        case (nil, false): differs = "taken, but \(intent.because)"
        case (let e?, true): differs = "refused (\(Errno.name(e))) although \(intent.because)"
        case (let e?, false) where e != intent.errno: differs = "refused with \(Errno.name(e)), but \(intent.because)"
        default: differs = nil
        }
        if let differs {
            ctx.findings.append(Finding(view: view, expected: intent.answer, meaning: differs,
                                        differingBytes: 0, differingPages: 0, totalRanges: 0, ranges: []))
        }
        guard refused == nil else { return }

        // Taken: the pin must be the page the process writes, and a shared
        // mapping's page the file's.
        let pin = IoUringFixedPin.held(ring: ring, region: region, in: ctx)
        ctx.notePages("when pinned")
        ctx.parentWrites()
        ctx.notePages("after the write")
        try ctx.expect(pin, holds: ctx.parentWrite, meaning: LongTermPinCases.staleMeaning)
        var file = [UInt8](repeating: 0, count: region.size)
        let n = try file.withUnsafeMutableBytes { try check("pread(file)", cp_pread_full(fd, $0.baseAddress, $0.count, 0)) }
        guard n == region.size else { throw HarnessError("pread(file) read \(n) of \(region.size) bytes") }
        if shared {
            ctx.expect("file (pread)", holds: ctx.parentWrite, seen: file,
                       meaning: "the write through the pinned MAP_SHARED mapping is not in the file")
        } else {
            ctx.expect("file (pread)", holds: ctx.original, seen: file,
                       meaning: "the write to the pinned MAP_PRIVATE mapping reached the file")
        }
    }
}
