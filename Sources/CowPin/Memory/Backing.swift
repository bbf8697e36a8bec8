import CCowPin

/// How the memory under test is provided. `make` maps it, fills it with the
/// case's original content and verifies it really is what the id says
/// (or throws CaseSkip with the reason).
public struct Backing: Sendable {
    public let id: String
    public let summary: String
    public let tags: [String]
    let make: @Sendable (CaseContext) throws -> Region

    public init(id: String, summary: String, tags: [String], make: @escaping @Sendable (CaseContext) throws -> Region) {
        self.id = id
        self.summary = summary
        self.tags = tags
        self.make = make
    }

    /// The backings every scenario of the foundation runs on.
    public static let standard: [Backing] = [.anonPage, .thpPMD, .thpPTE]

    /// One anonymous base page (MADV_NOHUGEPAGE: no THP, no mTHP).
    public static let anonPage = Backing(
        id: "anon-page", summary: "an anonymous base page (MADV_NOHUGEPAGE)", tags: ["anon"]
    ) { ctx in
        let page = Int(cp_page_size())
        let r = try Region.anonymous(size: page, origin: "anonymous base page")
        try r.madvise(Int32(CP_MADV_NOHUGEPAGE), name: "MADV_NOHUGEPAGE")
        r.fill(ctx.original)
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
        let huge = PageInfo.smapsValue("AnonHugePages", containing: r.base) ?? -1
        guard huge == 0 else {
            throw CaseSkip("THP still PMD-mapped after the mprotect() split (AnonHugePages: \(huge) kB)")
        }
        guard let isTHP = PageInfo.isTHP(address: r.base) else {
            throw CaseSkip("cannot verify a PTE-mapped THP: /proc/kpageflags and PFNs need root (CAP_SYS_ADMIN)")
        }
        guard isTHP else { throw CaseSkip("the THP was split into small pages by the mprotect() split") }
        return r
    }

    static func makePMDTHP(_ ctx: CaseContext) throws -> Region {
        let thp = ctx.probe.thp
        guard let size = thp.pmdSize else { throw CaseSkip("no THP support (/sys/kernel/mm/transparent_hugepage missing)") }
        if let why = thp.pmdUnavailableReason { throw CaseSkip(why) }
        let r = try Region.anonymousAligned(size: size, alignment: size, origin: "anonymous, MADV_HUGEPAGE")
        try r.madvise(Int32(CP_MADV_HUGEPAGE), name: "MADV_HUGEPAGE")
        r.fill(ctx.original)
        let huge = PageInfo.smapsValue("AnonHugePages", containing: r.base) ?? 0
        guard huge * 1024 >= size else {
            throw CaseSkip("no PMD THP after MADV_HUGEPAGE and first touch (AnonHugePages: \(huge) kB; defrag=\(thp.defrag ?? "?"))")
        }
        return r
    }
}
