import CCowPin
import CowPin
import Testing

/// The backings and events map what their ids say, on the real kernel: a
/// check that passes on the wrong memory proves nothing.
@Suite(.serialized)
struct BackingTests {
    let runner = Runner(options: RunOptions(timeoutMs: 2000))

    /// Runs `body` on `backing`; nil when the backing skipped here.
    func verdict(_ backing: Backing, _ body: @escaping @Sendable (CaseContext) throws -> Void) -> Verdict? {
        let s = Scenario(id: "selftest/backing", summary: "inspect the backing", steps: ["inspect"], tags: ["selftest"], body: body)
        let v = runner.run(Case(scenario: s, backing: backing)).verdict
        if case .skip(let reason) = v {
            recordSkip("\(backing.id): \(reason)")
            return nil
        }
        return v
    }

    static let shapes = Backing.thpShapes.filter { $0.id.hasPrefix("thp-") || $0.id.hasPrefix("mthp-64k-") }

    @Test("each THP shape is part of a THP of the size its id names", arguments: shapes.map(\.id))
    func shape(_ id: String) throws {
        let backing = try #require(Backing.thpShapes.first { $0.id == id })
        let page = Int(cp_page_size())
        let folio = id.hasPrefix("thp-") ? 2 << 20 : 64 << 10
        let expectedSize = id.contains("single-pte") ? page : id.contains("mremap-half") ? folio / 2 : folio
        let v = verdict(backing) { ctx in
            let r = ctx.region!
            guard r.size == expectedSize else { throw HarnessError("region of \(r.size) bytes, expected \(expectedSize)") }
            if id.hasSuffix("-swapped") {
                guard PageInfo.entry(address: r.base)?.swapped == true else { throw HarnessError("not swapped out") }
                return
            }
            guard PageInfo.isTHP(address: r.base) == true else { throw HarnessError("first page is not part of a THP") }
            if id.contains("mremap-half") {
                // The upper half is gone from here: nothing mapped right after the region.
                guard PageInfo.entry(address: r.base + r.size)?.present != true else {
                    throw HarnessError("the upper half is still mapped in place")
                }
            }
        }
        if let v { #expect(v == .coherent, "\(v)") }
    }

    @Test("the KSM backing maps a KSM page, ksmd is stopped before the scenario runs, and its knobs are back after the case")
    func ksmPage() throws {
        let before = readFile("/sys/kernel/mm/ksm/run")
        let v = verdict(.ksmPage) { ctx in
            guard let pfn = PageInfo.entry(address: ctx.region.base)?.pfn, let f = PageInfo.kpageflags(pfn: pfn),
                  PageInfo.flagList(f).contains("ksm") else { throw HarnessError("not a KSM page") }
            // Nothing merges, splits or write-protects behind the scenario.
            guard readFile("/sys/kernel/mm/ksm/run")?.trimmingCharacters(in: .whitespacesAndNewlines) == "0" else { throw HarnessError("ksmd still runs during the scenario") }
        }
        if let v { #expect(v == .coherent, "\(v)") }
        #expect(readFile("/sys/kernel/mm/ksm/run") == before)
    }

    /// The pin events only mean something if the event happens to memory that
    /// is not pinned: MADV_PAGEOUT really swaps an unpinned page out here.
    @Test("MADV_PAGEOUT swaps out an unpinned page (the pageout-write event is real)")
    func pageoutWorks() throws {
        let v = verdict(.anonPage) { ctx in
            try SystemState.shared.ensureSwap()
            let out = { PageInfo.entry(address: ctx.region.base)?.swapped == true }
            try ctx.region.pageOut(until: out)
            guard out() else { throw HarnessError("still mapped after MADV_PAGEOUT") }
        }
        if let v { #expect(v == .coherent, "\(v)") }
    }

    @Test("mremap() moves the region and its content")
    func mremapMoves() throws {
        let v = verdict(.thpPMD) { ctx in
            let r = ctx.region!
            let old = r.base
            try r.move(alignment: r.size)
            guard r.base != old, Int(bitPattern: r.base) % r.size == 0 else { throw HarnessError("not moved to an aligned address") }
            guard PageInfo.entry(address: old)?.present != true else { throw HarnessError("the old address still maps a page") }
            ctx.expectParent(holds: ctx.original, meaning: "the content did not move with the mapping")
        }
        if let v { #expect(v == .coherent, "\(v)") }
    }
}
