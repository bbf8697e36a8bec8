import CCowPin
import Glibc

/// How the memory under test is provided. `make` maps it, fills it with the
/// case's original content and verifies it really is what the id says
/// (or throws CaseSkip with the reason).
public struct Backing: Sendable {
    public let id: String
    public let summary: String
    public let tags: [String]
    /// What making it needs of state all processes share.
    public let needs: SharedNeeds
    let make: @Sendable (CaseContext) throws -> Region

    public init(id: String, summary: String, tags: [String], needs: SharedNeeds = .none,
                make: @escaping @Sendable (CaseContext) throws -> Region) {
        self.id = id
        self.summary = summary
        self.tags = tags
        self.needs = needs
        self.make = make
    }

    /// mTHP sizes cowpin knows (x86-64: 16 KiB to 1 MiB); a kernel without one skips it.
    public static let mthpSizesKB = [16, 32, 64, 128, 256, 512, 1024]

    /// This backing, then MADV_PAGEOUT: the case starts with the memory in swap
    /// (a swap device is made when none is active; journaled, removed after).
    public func swappedOut() -> Backing {
        let base = self
        return Backing(id: id + "-swapped", summary: summary + ", swapped out (MADV_PAGEOUT)", tags: tags + ["swap"],
                       needs: needs.merged(.swap)) { ctx in
            try SystemState.shared.ensureSwap()
            let r = try base.make(ctx)
            let ends = Set([0, r.pages - 1])
            try r.pageOut { ends.allSatisfy { PageInfo.entry(address: r.address(ofPage: $0))?.swapped == true } }
            for page in ends {
                guard PageInfo.entry(address: r.address(ofPage: page))?.swapped == true else {
                    throw CaseSkip("MADV_PAGEOUT did not swap out page \(page) of \(base.summary)")
                }
            }
            return r
        }
    }

    /// Huge pages reserved per case: the region, the child's COW copy, and
    /// copies a pin may force. A gigantic page is never needed more than
    /// twice at once (the region and one copy), and few are free at runtime.
    static func hugetlbPagesPerCase(_ kb: Int) -> Int { kb >= 1 << 20 ? 2 : 4 }

    /// What a case on `count` huge pages of `kb` KiB needs: the pool grown;
    /// gigantic pages (few free at runtime) for one case at a time.
    static func hugetlbNeeds(kb: Int, count: Int) -> SharedNeeds {
        SharedNeeds(hugePages: [kb: count], alone: kb >= 1 << 20)
    }

    /// One anonymous hugetlb page of `kb` KiB (MAP_HUGETLB). The pool is grown
    /// by what the case needs (journaled: restored when the case ends).
    public static func hugetlb(_ kb: Int) -> Backing {
        // A gigantic page takes about a second per case to fill and compare:
        // "slow" keeps it out of the default selection.
        Backing(id: "hugetlb-\(kb)k", summary: "an anonymous hugetlb page of \(kb) KiB",
                tags: ["hugetlb"] + (kb >= 1 << 20 ? [Selection.slowTag] : []), needs: hugetlbNeeds(kb: kb, count: hugetlbPagesPerCase(kb))) { ctx in
            try reserveHugePages(kb: kb, count: hugetlbPagesPerCase(kb), ctx: ctx)
            let r = try Region.hugetlb(size: kb * 1024)
            r.fill(ctx.original)
            return r
        }
    }

    /// Makes `count` free huge pages of `kb` KiB available to the case: the
    /// pool is grown by the deficit (journaled: restored when the case ends)
    /// and the cross-process lock is held until the case ends. Beside other
    /// cases, the supervisor grew it for all of them.
    static func reserveHugePages(kb: Int, count: Int, ctx: CaseContext) throws {
        guard ctx.probe.hugetlb.contains(where: { $0.sizeKB == kb }) else {
            throw CaseSkip("no \(kb) KiB hugetlb pages on this kernel (no /sys/kernel/mm/hugepages/hugepages-\(kb)kB)")
        }
        // Free huge pages are shared by every process: another run could
        // take them between the check and the child's COW fault (SIGBUS).
        // Only a process that reserves them, under the lock, can rely on them.
        guard Probe.isRoot else { throw CaseSkip("reserving hugetlb pages for the case needs root (nr_hugepages)") }
        if SystemState.shared.besideOthers {
            // Pages an earlier case's io_uring still holds come back soon (bounded).
            guard poll(boundMs: 2_000, everyUs: 1_000, { freeHugePages(kb) >= count }) else {
                throw CaseSkip("only \(freeHugePages(kb)) free \(kb) KiB huge pages of \(count) needed, 2 s after the phase's reservation")
            }
            return
        }
        try SystemState.shared.lockForCase()
        try growHugetlbPool(kb: kb, free: count)
    }

    static func freeHugePages(_ kb: Int) -> Int {
        readFile("/sys/kernel/mm/hugepages/hugepages-\(kb)kB/free_hugepages").flatMap { Int($0.trimmed) } ?? 0
    }

    /// Grows the pool of `kb` KiB huge pages until `free` are free
    /// (journaled: restored when the case, or the supervisor's phase, ends).
    /// Call under the cross-process lock.
    public static func growHugetlbPool(kb: Int, free count: Int) throws {
        let dir = "/sys/kernel/mm/hugepages/hugepages-\(kb)kB"
        guard access(dir, F_OK) == 0 else { throw CaseSkip("no \(kb) KiB hugetlb pages on this kernel (no \(dir))") }
        func value(_ f: String) -> Int { readFile("\(dir)/\(f)").flatMap { Int($0.trimmed) } ?? 0 }
        // Grow the pool by the deficit; pages a previous case still holds
        // (io_uring releases registered buffers asynchronously) may make
        // one step short, so take up to three.
        var free = value("free_hugepages")
        for _ in 0..<3 where free < count {
            try SystemState.shared.set("\(dir)/nr_hugepages", String(value("nr_hugepages") + count - free))
            free = value("free_hugepages")
        }
        guard free >= count else {
            throw CaseSkip("could reserve only \(free) free \(kb) KiB huge pages of \(count) needed (memory fragmented?)")
        }
    }

    /// An anonymous multi-size THP of `kb` KiB: that size is set to "madvise"
    /// for the case (journaled, restored), the area is aligned to it and
    /// MADV_HUGEPAGE; verified in /proc/kpageflags as one large folio.
    public static func mthp(_ kb: Int) -> Backing {
        let knob = "/sys/kernel/mm/transparent_hugepage/hugepages-\(kb)kB/enabled"
        let needs = SharedNeeds(knobs: [.init(knob, "madvise")])
        return Backing(id: "mthp-\(kb)k", summary: "an anonymous \(kb) KiB mTHP", tags: ["anon", "thp", "mthp"], needs: needs) { ctx in
            guard ctx.probe.thp.sizes.contains(where: { $0.sizeKB == kb }) else {
                throw CaseSkip("no \(kb) KiB mTHP on this kernel (no \(knob); multi-size THP needs 6.8 or later)")
            }
            if ctx.probe.thp.enabled == "never" { throw CaseSkip("THP disabled (transparent_hugepage/enabled=never)") }
            try SystemState.shared.set(needs.knobs)
            let size = kb * 1024
            let r = try Region.anonymousAligned(size: size, alignment: size, origin: "anonymous, \(kb) KiB mTHP")
            try r.madvise(Int32(CP_MADV_HUGEPAGE), name: "MADV_HUGEPAGE")
            r.fill(ctx.original)
            try requireFolio(r, what: "a \(kb) KiB mTHP")
            return r
        }
    }

    /// Skips unless the region is one large folio: THP pages, the first the
    /// head, physically contiguous (root only: PFNs and kpageflags).
    static func requireFolio(_ r: Region, what: String) throws {
        let last = r.pages - 1
        guard let first = PageInfo.entry(address: r.base)?.pfn, let lastPFN = PageInfo.entry(address: r.address(ofPage: last))?.pfn,
              let f0 = PageInfo.kpageflags(pfn: first), let fl = PageInfo.kpageflags(pfn: lastPFN) else {
            throw CaseSkip("cannot verify \(what): \(PageInfo.whyUnreadable)")
        }
        let head = PageInfo.flagList(f0), tail = PageInfo.flagList(fl)
        guard head.contains("thp"), head.contains("compound_head"), tail.contains("compound_tail"), lastPFN == first + UInt64(last) else {
            throw CaseSkip("no \(what) after MADV_HUGEPAGE and first touch (first page: \(head.joined(separator: ",")); last page: \(tail.joined(separator: ",")))")
        }
    }

    /// One anonymous base page (MADV_NOHUGEPAGE: no THP, no mTHP).
    public static let anonPage = Backing(
        id: "anon-page", summary: "an anonymous base page (MADV_NOHUGEPAGE)", tags: ["anon"]
    ) { ctx in
        let r = try basePage("anonymous base page")
        r.fill(ctx.original)
        return r
    }

    /// One anonymous page, MADV_NOHUGEPAGE (no THP, no mTHP), not touched yet.
    static func basePage(_ origin: String) throws -> Region {
        let r = try Region.anonymous(size: Int(cp_page_size()), origin: origin)
        try r.madvise(Int32(CP_MADV_NOHUGEPAGE), name: "MADV_NOHUGEPAGE")
        return r
    }

    /// A PMD-mapped transparent huge page (aligned, MADV_HUGEPAGE).
    public static let thpPMD = Backing(
        id: "thp-pmd", summary: "a PMD-mapped anonymous THP (MADV_HUGEPAGE)", tags: ["anon", "thp"]
    ) { ctx in
        try makePMDTHP(ctx)
    }

    /// A THP mapped by PTEs: a PMD THP whose mapping was split by mprotect()ing one subpage.
    public static let thpPTE = Backing(
        id: "thp-pte", summary: "a PTE-mapped anonymous THP", tags: ["anon", "thp"]
    ) { ctx in
        let r = try makePMDTHP(ctx)
        // Changing the protection of one subpage splits the PMD mapping; the
        // folio stays a THP.
        try r.mprotect(Int32(CP_PROT_READ), range: r.pageSize..<(2 * r.pageSize))
        try r.mprotect(Int32(CP_PROT_READ_WRITE), range: r.pageSize..<(2 * r.pageSize))
        let huge = PageInfo.pmdMappedKB(r) ?? -1
        guard huge == 0 else {
            throw CaseSkip("THP still PMD-mapped after the mprotect() split (PMD-mapped: \(huge) kB)")
        }
        guard let isTHP = PageInfo.isTHP(address: r.base) else {
            throw CaseSkip("cannot verify a PTE-mapped THP: \(PageInfo.whyUnreadable)")
        }
        guard isTHP else { throw CaseSkip("the THP was split into small pages by the mprotect() split") }
        return r
    }

    /// Never touched: no page is mapped until the first access.
    public static let anonUnpopulated = Backing(
        id: "anon-unpopulated", summary: "an anonymous page never touched", tags: ["anon", "unpopulated"]
    ) { ctx in
        let r = try basePage("anonymous, never touched")
        ctx.original = .zero
        return r
    }

    /// Read before any write: the shared zeropage is mapped.
    public static let anonZeropage = Backing(
        id: "anon-zeropage", summary: "an anonymous page mapping the shared zeropage (read, never written)", tags: ["anon", "zeropage"]
    ) { ctx in
        let r = try basePage("anonymous, read fault")
        cp_touch_read(r.base, r.size, r.pageSize)
        try requireFlag("zero_page", r, what: "the shared zeropage")
        ctx.original = .zero
        return r
    }

    /// A THP-sized aligned area read before any write: the huge zeropage.
    public static let thpZeropage = Backing(
        id: "thp-zeropage", summary: "a PMD-sized area mapping the huge zeropage (MADV_HUGEPAGE, read)", tags: ["anon", "thp", "zeropage"]
    ) { ctx in
        let thp = ctx.probe.thp
        guard let size = thp.pmdSize else { throw CaseSkip("no THP support (/sys/kernel/mm/transparent_hugepage missing)") }
        if let why = thp.pmdUnavailableReason { throw CaseSkip(why) }
        guard thp.useZeroPage == true else { throw CaseSkip("the huge zeropage is off (transparent_hugepage/use_zero_page=0)") }
        let r = try Region.anonymousAligned(size: size, alignment: size, origin: "anonymous, MADV_HUGEPAGE, read fault")
        try r.madvise(Int32(CP_MADV_HUGEPAGE), name: "MADV_HUGEPAGE")
        cp_touch_read(r.base, r.size, r.pageSize)
        try requireFlag("zero_page", r, what: "the huge zeropage")
        ctx.original = .zero
        return r
    }

    /// Skips unless kpageflags shows `flag` on the region's first page (root only).
    static func requireFlag(_ flag: String, _ r: Region, what: String) throws {
        guard let pfn = PageInfo.entry(address: r.base)?.pfn, let raw = PageInfo.kpageflags(pfn: pfn) else {
            throw CaseSkip("cannot verify that \(what) is mapped: \(PageInfo.whyUnreadable)")
        }
        guard PageInfo.flagList(raw).contains(flag) else {
            throw CaseSkip("\(what) is not mapped after a read fault (page flags: \(PageInfo.flagList(raw).joined(separator: ",")))")
        }
    }

    static func makePMDTHP(_ ctx: CaseContext) throws -> Region {
        let thp = ctx.probe.thp
        guard let size = thp.pmdSize else { throw CaseSkip("no THP support (/sys/kernel/mm/transparent_hugepage missing)") }
        if let why = thp.pmdUnavailableReason { throw CaseSkip(why) }
        let r = try Region.anonymousAligned(size: size, alignment: size, origin: "anonymous, MADV_HUGEPAGE")
        try r.madvise(Int32(CP_MADV_HUGEPAGE), name: "MADV_HUGEPAGE")
        r.fill(ctx.original)
        let huge = PageInfo.pmdMappedKB(r) ?? 0
        guard huge * 1024 >= size else {
            throw CaseSkip("no PMD THP after MADV_HUGEPAGE and first touch (PMD-mapped: \(huge) kB; defrag=\(thp.defrag ?? "?"))")
        }
        return r
    }
}
