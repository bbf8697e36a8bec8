import CCowPin

/// The ways kselftest mm/cow.c maps part of a THP, for every THP size: what
/// the case then works on is not the whole folio, or not a folio that was
/// ever wholly shared.
public enum THPShape: String, CaseIterable, Sendable {
    /// All subpages but the first MADV_DONTNEED'd: one PTE maps one subpage of the folio.
    case singlePTE = "single-pte"
    /// The upper half mremap()ed elsewhere: the case works on the lower half.
    case mremapHalf = "mremap-half"
    /// Only the first subpage was ever shared with a (now exited) child.
    case partialShared = "partial-shared"

    var summary: String {
        switch self {
        case .singlePTE: return "a single PTE of"
        case .mremapHalf: return "the lower half (the upper half mremap()ed away) of"
        case .partialShared: return "(only its first subpage once shared with a child that exited)"
        }
    }
}

extension Backing {
    /// The THP sizes cowpin runs shapes on: the PMD size (thp-pmd) and every mTHP size.
    static var thpBases: [Backing] { [thpPMD] + mthpSizesKB.map(mthp) }

    /// `base` (a THP backing), then reshaped. Ids: `thp-single-pte`,
    /// `mthp-64k-mremap-half`, ...
    public static func shaped(_ base: Backing, _ shape: THPShape) -> Backing {
        let prefix = base.id == thpPMD.id ? "thp" : base.id
        let summary = shape == .partialShared ? "\(base.summary) \(shape.summary)" : "\(shape.summary) \(base.summary)"
        return Backing(id: "\(prefix)-\(shape.rawValue)", summary: summary, tags: base.tags + ["thp-shape", shape.rawValue],
                       needs: base.needs) { ctx in
            let r = try base.make(ctx)
            let page = r.pageSize
            switch shape {
            case .singlePTE:
                try r.madvise(Int32(CP_MADV_DONTNEED), name: "MADV_DONTNEED", range: page..<r.size)
                let single = Region(base: r.base, size: page, origin: "\(r.origin), all but the first subpage discarded")
                single.keep(r.base + page, size: r.size - page)
                r.abandon()
                try requireStillTHP(single, what: "the remaining subpage")
                return single
            case .mremapHalf:
                let half = r.size / 2
                let away = try Region.anonymous(size: half, origin: "mremap target")
                let r2 = cp_mremap_fixed(r.base + half, half, away.base)
                try check("mremap(upper half, MREMAP_MAYMOVE|MREMAP_FIXED)", r2)
                away.abandon()
                let lower = Region(base: r.base, size: half, origin: "\(r.origin), upper half mremap()ed away")
                lower.keep(away.base, size: half)
                r.abandon()
                try requireStillTHP(lower, what: "the lower half")
                return lower
            case .partialShared:
                try r.madvise(Int32(CP_MADV_DONTFORK), name: "MADV_DONTFORK", range: page..<r.size)
                let child = try ctx.fork { _ in }
                try child.finish()
                try r.madvise(Int32(CP_MADV_DOFORK), name: "MADV_DOFORK", range: page..<r.size)
                return r
            }
        }
    }

    /// Skips unless the first page of `r` is still part of a THP (kpageflags, root only).
    static func requireStillTHP(_ r: Region, what: String) throws {
        guard let isTHP = PageInfo.isTHP(address: r.base) else {
            throw CaseSkip("cannot verify that \(what) is still a THP: \(PageInfo.whyUnreadable)")
        }
        guard isTHP else { throw CaseSkip("\(what) is no longer part of a THP (the kernel split it)") }
    }
}
