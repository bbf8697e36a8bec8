import CCowPin
import Glibc

/// Copy-on-write of memory a MAP_PRIVATE mapping shares with others before
/// its first write: a file's pagecache page, or the shared zeropage (kselftest
/// mm/cow.c runs its non-anonymous tests on these). The write must give the
/// process a private copy and leave the shared page alone.
public enum FileCOWCases {
    public static let scenarios: [Scenario] = [privateFileWrite]

    static let privateFileWrite = Scenario(
        id: "cow/private-file-write",
        summary: "the parent writes a MAP_PRIVATE mapping of a page never written (a file's pagecache page, or the zeropage)",
        steps: ["map the memory MAP_PRIVATE and read it: the file's pagecache page, or the shared zeropage (huge zeropage), is mapped",
                "file backings: map the same file MAP_SHARED, read-only (the file's view)",
                "the parent writes 0xff into its MAP_PRIVATE mapping (COW: a private anonymous copy)",
                "the parent's mapping must hold the write",
                "file backings: the MAP_SHARED view (the file) must still hold the original content",
                "zeropage backings: a second, fresh read-only private anonymous mapping, read, must still hold zeroes"],
        tags: ["cow", "nopin", "private-file"],
        backings: Backing.privateFiles + [.anonZeropage, .thpZeropage]
    ) { ctx in
        let region = ctx.region!
        let view = try region.file.map { _ in try sharedView(ctx) }
        ctx.notePages("before the write")
        ctx.parentWrites()
        ctx.notePages("after the write")
        try check(ctx, fileView: view)
    }

    /// The file behind the region, mapped MAP_SHARED read-only (unmapped when the case ends).
    public static func sharedView(_ ctx: CaseContext, prot: Int32 = Int32(CP_PROT_READ)) throws -> Region {
        let region = ctx.region!
        guard let fd = region.file else { throw HarnessError("the backing mapped no file") }
        var err: Int32 = 0
        guard let p = cp_mmap_fd(region.size, prot, 1, fd, 0, &err) else {
            throw SyscallError("mmap(the file, MAP_SHARED)", errno: err)
        }
        let view = Region(base: p, size: region.size, origin: "the file, MAP_SHARED")
        ctx.onCleanup { view.release() }
        return view
    }

    /// What must hold after the parent wrote its MAP_PRIVATE mapping: the
    /// write in the parent, and the shared page untouched: the file (seen
    /// through `fileView`), or, without a file, the zeropage, seen through a
    /// fresh read-only mapping that maps it again.
    public static func check(_ ctx: CaseContext, fileView: Region?) throws {
        let region = ctx.region!
        ctx.expectParent(holds: ctx.parentWrite, meaning: "the parent's write to its private mapping is lost")
        if let fileView {
            ctx.expect("file (MAP_SHARED view)", holds: ctx.original, seen: fileView.bytes,
                       meaning: "the write to the MAP_PRIVATE mapping reached the file: the pagecache page was written, not copied")
            return
        }
        let fresh = region.size > region.pageSize
            ? try Region.anonymousAligned(size: region.size, alignment: region.size, origin: "fresh anonymous mapping, MADV_HUGEPAGE")
            : try Region.anonymous(size: region.size, origin: "fresh anonymous mapping")
        defer { fresh.release() }
        if region.size > region.pageSize { try fresh.madvise(Int32(CP_MADV_HUGEPAGE), name: "MADV_HUGEPAGE") }
        try fresh.mprotect(Int32(CP_PROT_READ))
        cp_touch_read(fresh.base, fresh.size, fresh.pageSize)
        ctx.expect("a fresh read-only private anonymous mapping (the zeropage)", holds: .zero, seen: fresh.bytes,
                   meaning: "the write to the private mapping reached the shared zeropage: every process reading untouched memory sees it")
    }
}
