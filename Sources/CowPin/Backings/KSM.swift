import CCowPin
import Glibc

/// Kernel samepage merging, driven deterministically: ksmd is started for the
/// case with no sleep between scans (knobs journaled, restored when the case
/// ends), every wait is for something ksmd reports (a merged page, a
/// completed full scan), bounded, and ksmd is stopped again as soon as the
/// case has seen what it needs (`stop`), before the case goes on.
enum KSM {
    static let dir = "/sys/kernel/mm/ksm"
    /// Bound for a merge or a full scan. ksmd with sleep_millisecs=0 takes
    /// ~1 ms here, ~100 ms for the first merge of a process; a loaded machine
    /// can starve the ksmd thread for much longer.
    static let boundMs = 5_000

    /// Starts ksmd for the case: run=1, sleep_millisecs=0, a large pages_to_scan.
    static func start(_ ctx: CaseContext) throws {
        guard ctx.probe.ksm.available else { throw CaseSkip(ctx.probe.ksm.detail) }
        guard Probe.isRoot else { throw CaseSkip("starting ksmd needs root (/sys/kernel/mm/ksm/run)") }
        try SystemState.shared.set(needs.knobs)
    }

    /// ksmd's knobs for a case, `run` last. Smart scan (6.7+) skips pages
    /// that failed to merge for several scans, and its state can outlive a
    /// mapping whose address a later case reuses: off, so every scan looks
    /// at every page. A KSM case runs alone, starting and stopping ksmd
    /// itself: side by side (ksmd running for the whole phase), one case in
    /// about 3300 saw its copies not merged within the bound.
    static let needs = SharedNeeds(knobs: (access("\(dir)/smart_scan", F_OK) == 0 ? [.init("\(dir)/smart_scan", "0")] : [])
        + [.init("\(dir)/pages_to_scan", "4096"), .init("\(dir)/sleep_millisecs", "0"), .init("\(dir)/run", "1")], alone: true)

    /// Stops ksmd (run=0; journaled with the case's other knobs, restored
    /// when it ends). The write returns once ksmd has finished the batch it
    /// was scanning (run_store() takes ksm_thread_mutex, which ksmd holds
    /// while it scans), so from then on ksmd touches none of the case's
    /// pages: merged pages stay merged, and nothing is merged, split or
    /// write-protected behind the case while it writes, forks, releases its
    /// pin and unmaps its memory. Left running through that teardown, ksmd
    /// split the THP of a ksm-merge-pinned case as soon as its pin was gone
    /// (split_huge_page() unmapping it, with a TLB-flush IPI) while the
    /// worker unmapped the same range; in a Debian 6.1 guest under QEMU TCG
    /// that IPI was never answered and both CPUs stayed stuck (soft lockup:
    /// ksmd in smp_call_function_many_cond(), the worker in munmap() waiting
    /// for the page table lock ksmd held).
    static func stop() throws {
        try SystemState.shared.set("\(dir)/run", "0")
    }

    static var fullScans: Int { readFile("\(dir)/full_scans").flatMap { Int($0.trimmed) } ?? -1 }

    /// Whether every page of `r` is a KSM page (kpageflags; nil if unreadable).
    static func merged(_ r: Region) -> Bool? {
        for page in 0..<r.pages {
            guard let pfn = PageInfo.entry(address: r.address(ofPage: page))?.pfn, let f = PageInfo.kpageflags(pfn: pfn) else { return nil }
            if f & (1 << 21) == 0 { return false }
        }
        return true
    }

    /// Polls `done` every 100 us until it holds; false after the bound.
    static func poll(_ done: () -> Bool) -> Bool {
        CowPin.poll(boundMs: boundMs, everyUs: 100, done)
    }

    /// Waits (bounded) until every page of `r` is a KSM page; skips with the
    /// reason otherwise (`what` names the pages: "the page", "the unpinned copies").
    static func awaitMerged(_ r: Region, what: String) throws {
        guard poll({ merged(r) == true }) else {
            if merged(r) == nil { throw CaseSkip("cannot verify the KSM merge: \(PageInfo.whyUnreadable)") }
            throw CaseSkip("ksmd did not merge \(what) within \(boundMs) ms")
        }
    }

    /// Waits until ksmd has finished `n` more full scans.
    static func awaitFullScans(_ n: Int) throws {
        let start = fullScans
        guard start >= 0 else { throw CaseSkip("cannot read \(dir)/full_scans") }
        guard poll({ fullScans >= start + n }) else {
            throw HarnessError("ksmd did not complete \(n) full scans within \(boundMs) ms")
        }
    }

    /// Two more mappings holding what `r` holds, MADV_MERGEABLE, merged with
    /// each other (and with `r`, if the kernel lets it): proof that ksmd saw
    /// this content. Unmapped with `r`.
    static func twins(of r: Region) throws -> [Region] {
        let twins = try (0..<2).map { _ in try Region.anonymous(size: r.size, origin: "KSM twin") }
        for t in twins {
            try t.madvise(Int32(CP_MADV_NOHUGEPAGE), name: "MADV_NOHUGEPAGE")
            UnsafeMutableRawBufferPointer(start: t.base, count: t.size).copyMemory(from: r.bytes)
            try t.madvise(Int32(CP_MADV_MERGEABLE), name: "MADV_MERGEABLE")
            t.abandon()
            r.keep(t.base, size: t.size)
        }
        return twins
    }
}

extension Backing {
    /// An anonymous base page merged by KSM with identical pages elsewhere:
    /// a write-protected page shared across mappings, never anon-exclusive.
    public static let ksmPage = Backing(
        id: "ksm-page", summary: "an anonymous base page merged by KSM (MADV_MERGEABLE)", tags: ["anon", "ksm"], needs: KSM.needs
    ) { ctx in
        try KSM.start(ctx)
        let r = try basePage("anonymous, KSM-merged")
        r.fill(ctx.original)
        _ = try KSM.twins(of: r)
        try r.madvise(Int32(CP_MADV_MERGEABLE), name: "MADV_MERGEABLE")
        try KSM.awaitMerged(r, what: "the page")
        // The page stays a KSM page; the scenario runs with ksmd stopped.
        try KSM.stop()
        return r
    }
}
