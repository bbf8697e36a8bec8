import CCowPin
import Glibc

/// A mapping the harness owns. Unmapped on release unless a case unmapped it.
public final class Region {
    public private(set) var base: UnsafeMutableRawPointer
    public let size: Int
    public let pageSize: Int
    /// Where the mapping came from, for evidence ("anonymous, MADV_HUGEPAGE").
    public let origin: String
    /// The file a file backing mapped (open until the case ends), or nil.
    public var file: Int32?
    public private(set) var isMapped = true
    /// Other mappings the backing made around the region (the rest of a THP,
    /// its mremap()ed half), unmapped with it.
    var companions: [(base: UnsafeMutableRawPointer, size: Int)] = []

    public init(base: UnsafeMutableRawPointer, size: Int, origin: String) {
        self.base = base
        self.size = size
        self.pageSize = Int(cp_page_size())
        self.origin = origin
    }

    /// A private (or shared) anonymous mapping.
    public static func anonymous(size: Int, shared: Bool = false, populate: Bool = false, origin: String = "anonymous") throws -> Region {
        var err: Int32 = 0
        guard let p = cp_mmap_anon(size, shared ? 1 : 0, populate ? MAP_POPULATE : 0, &err) else {
            throw SyscallError("mmap(\(size) bytes, \(shared ? "MAP_SHARED" : "MAP_PRIVATE")|MAP_ANONYMOUS)", errno: err)
        }
        return Region(base: p, size: size, origin: origin)
    }

    /// Anonymous hugetlb memory (MAP_HUGETLB) of one huge page of `size` bytes.
    public static func hugetlb(size: Int) throws -> Region {
        var err: Int32 = 0
        let shift = Int32(size.trailingZeroBitCount) << Int32(CP_MAP_HUGE_SHIFT)
        guard let p = cp_mmap_anon(size, 0, Int32(CP_MAP_HUGETLB) | shift, &err) else {
            // Another process (a parallel run) may have taken the free pages.
            if err == ENOMEM { throw CaseSkip("no free \(size / 1024) KiB huge page for MAP_HUGETLB (the pool is used up)") }
            throw SyscallError("mmap(MAP_HUGETLB, \(size / 1024) KiB)", errno: err)
        }
        return Region(base: p, size: size, origin: "hugetlb \(size / 1024) KiB")
    }

    /// An anonymous mapping of `size` bytes aligned to `alignment`.
    public static func anonymousAligned(size: Int, alignment: Int, origin: String) throws -> Region {
        var err: Int32 = 0
        let span = size + alignment
        guard let p = cp_mmap_anon(span, 0, 0, &err) else {
            throw SyscallError("mmap(\(span) bytes)", errno: err)
        }
        let start = Int(bitPattern: p)
        let aligned = (start + alignment - 1) & ~(alignment - 1)
        if aligned > start { cp_munmap(p, aligned - start) }
        let tail = start + span - (aligned + size)
        if tail > 0 { cp_munmap(UnsafeMutableRawPointer(bitPattern: aligned + size), tail) }
        return Region(base: UnsafeMutableRawPointer(bitPattern: aligned)!, size: size, origin: origin)
    }

    deinit { release() }

    public func release() {
        if isMapped {
            cp_munmap(base, size)
            isMapped = false
        }
        for c in companions { cp_munmap(c.base, c.size) }
        companions = []
    }

    /// Hands the mapping over to other regions: this one no longer unmaps it.
    func abandon() {
        isMapped = false
        companions = []
    }

    /// Unmaps `mapping` with this region.
    func keep(_ mapping: UnsafeMutableRawPointer, size: Int) { companions.append((mapping, size)) }

    /// mremap(MREMAP_MAYMOVE|MREMAP_FIXED) to a new address aligned to
    /// `alignment` (so a PMD mapping can stay one); the region follows.
    public func move(alignment: Int) throws {
        let target = try Region.anonymousAligned(size: size, alignment: max(alignment, pageSize), origin: "mremap target")
        let to = target.base
        target.isMapped = false // the mremap replaces it
        let r = cp_mremap_fixed(base, size, to)
        if r != 0 { cp_munmap(to, size) }
        try check("mremap(MREMAP_MAYMOVE|MREMAP_FIXED)", r)
        base = to
    }

    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: size) }
    public var pages: Int { size / pageSize }

    public func address(ofPage page: Int) -> UnsafeMutableRawPointer { base + page * pageSize }

    public func fill(_ content: Content, range: Range<Int>? = nil) {
        let r = range ?? 0..<size
        content.materialize(into: UnsafeMutableRawBufferPointer(start: base + r.lowerBound, count: r.count), offset: r.lowerBound)
    }

    public func madvise(_ advice: Int32, name: String, range: Range<Int>? = nil) throws {
        let r = range ?? 0..<size
        try check("madvise(\(name))", cp_madvise(base + r.lowerBound, r.count, advice))
    }

    /// MADV_PAGEOUT of the region until `isOut` holds. A new page may still
    /// sit in another CPU's batch, off the LRU, where reclaim skips it (the
    /// advice drains the calling CPU's batch only): when the first advice
    /// leaves it mapped, the advice is given again on each CPU in turn.
    public func pageOut(until isOut: () -> Bool) throws {
        try madvise(Int32(CP_MADV_PAGEOUT), name: "MADV_PAGEOUT")
        if isOut() { return }
        try check("madvise(MADV_PAGEOUT) on each CPU", cp_pageout_on_each_cpu(base, size))
    }

    public func mprotect(_ prot: Int32, range: Range<Int>? = nil) throws {
        let r = range ?? 0..<size
        let name = prot == Int32(CP_PROT_READ) ? "PROT_READ" : prot == Int32(CP_PROT_READ_WRITE) ? "PROT_READ|PROT_WRITE" : "\(prot)"
        try check("mprotect(\(name))", cp_mprotect(base + r.lowerBound, r.count, prot))
    }

    /// munmap() by a case; the region is not touched again.
    public func unmap() throws {
        try check("munmap", cp_munmap(base, size))
        isMapped = false
    }

}

/// Memory shared between parent and child (MAP_SHARED): the child's status
/// block and reports. Buffers up to 4 MiB are kept for the next user of the
/// same size (their pages stay allocated: no shmem fault and clearing per
/// case), so a buffer holds whatever its last user left: every user writes
/// what it relies on (the child status block and the report header) first.
final class SharedBuffer {
    let region: Region
    static let pool = SizePool<Region>()

    init(size: Int) throws {
        let n = max(size, 1)
        region = try Self.pool.take(size: n) ?? Region.anonymous(size: n, shared: true, origin: "shared report buffer")
    }

    deinit {
        if region.isMapped { Self.pool.give(region, size: region.size) }
    }
    var base: UnsafeMutableRawPointer { region.base }
    var size: Int { region.size }
}

/// Memory kept for the next user of the same size (up to 4 MiB, two of each
/// size): its pages stay allocated, so reuse costs no faults and no clearing.
final class SizePool<Item>: @unchecked Sendable {
    static var limit: Int { 4 << 20 }
    private let kept = Locked<[Int: [Item]]>([:])

    func take(size: Int) -> Item? { kept.with { $0[size]?.popLast() } }

    func give(_ item: Item, size: Int) {
        guard size <= Self.limit else { return }
        kept.with { k in
            if k[size, default: []].count < 2 { k[size, default: []].append(item) }
        }
    }
}
