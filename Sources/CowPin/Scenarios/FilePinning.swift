import CCowPin
import Glibc
import SystemPackage

/// Long-term R/W pins of file mappings, as kselftest mm/gup_longterm.c checks
/// them, with io_uring fixed buffers (IORING_REGISTER_BUFFERS is always
/// FOLL_WRITE|FOLL_PIN|FOLL_LONGTERM). A pin of a shared mapping on a file
/// system that writes dirty pages back (ext4, xfs, btrfs) would let the
/// device write a page after writeback cleaned it: upstream refuses it.
/// Whether the kernel takes the pin is a policy fact: the case records it
/// (`CaseContext.policy`) and `cowpin matrix` compares it with upstream's
/// rule for the release (data/expected-verdicts.json, `policies`). The
/// verdict is about data only: when the pin is taken, the pin and the file
/// must see the process's write as the mapping type says.
public enum FilePinningCases {
    public static let scenarios: [Scenario] = [scenario(shared: true), scenario(shared: false)]

    static func scenario(shared: Bool) -> Scenario {
        let mapping = shared ? "shared" : "private"
        let how = shared ? "MAP_SHARED" : "MAP_PRIVATE"
        return Scenario(
            id: "longterm-file/iouring-fixed-\(mapping)",
            summary: "io_uring fixed buffer (FOLL_WRITE|FOLL_PIN|FOLL_LONGTERM) in a \(how) file mapping: taken or refused (policy), and if taken the pin sees the process's write",
            steps: ["create the file (one page, or one huge page) and mmap() it \(how)",
                    shared ? "fault it in by writing (the pagecache page, dirty)" : "fault it in by writing (an anonymous copy of the pagecache page)",
                    "IORING_REGISTER_BUFFERS: record whether the kernel takes the pin or refuses it (errno), a policy fact that `cowpin matrix` compares with upstream's rule for the release",
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
        ctx.notePages("before the pin")

        let ring = try IoUring(entries: 4)
        let refused = try ring.tryRegister(region)
        ctx.note(refused.map { "pin refused: \(Errno.name($0))" } ?? "pin taken")
        ctx.policy = PolicyObservation(
            action: "io_uring IORING_REGISTER_BUFFERS of a \(shared ? "MAP_SHARED" : "MAP_PRIVATE") \(FileSystem.name(fs)) mapping",
            allowance: PinAllowance(taken: refused == nil, errno: refused.map { Errno.name($0) }))
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
