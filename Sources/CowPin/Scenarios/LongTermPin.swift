import CCowPin
import Glibc

/// Long-term pins (a driver's DMA buffer) under fork(), mprotect() and writes.
/// The events mirror kselftest mm/cow.c's R/O-pin and io_uring checks; each
/// runs with every pin method that fits it (R/O events need an R/O pin).
public enum LongTermPinCases {
    static let staleMeaning = "the pinned page is no longer the page the process maps: a device reads stale data and its DMA writes are lost to the process"

    /// What the device writes through a pin that writes (`PinCoverage.deviceWrites`).
    static let deviceWrite = Content.written(0xD5, by: "the device")

    /// The pins one case takes, and what follows its event: the device's
    /// write the process must see, and the pin's library's claim.
    final class Session {
        let method: PinMethod
        let ctx: CaseContext
        var pins: [Pin] = []

        init(_ method: PinMethod, _ ctx: CaseContext) {
            self.method = method
            self.ctx = ctx
        }

        /// Pins the region and notes the frames pinned (the pin keeps these).
        func pin() throws -> Pin {
            let p = try method.pin(ctx.region, in: ctx)
            pins.append(p)
            ctx.notePages("when pinned")
            return p
        }

        /// After the event: a pin whose device writes does so, and the
        /// process must see it; a claim of the pin's library about the event
        /// is noted beside the verdict, and a claim that the case contradicts
        /// is a line of its own.
        func finish(_ event: LongTermEvent) throws {
            if method.coverage.deviceWrites {
                ctx.extraCandidates.append(LongTermPinCases.deviceWrite)
                for p in pins {
                    try p.deviceWrite(LongTermPinCases.deviceWrite)
                    ctx.expect("parent mapping, after the device's write", holds: Layout(LongTermPinCases.deviceWrite),
                               seen: UnsafeRawBufferPointer(rebasing: ctx.region.bytes[p.observed]), at: p.observed.lowerBound,
                               meaning: "the device's write through the pin did not reach the process: the pinned page is no longer the page the process maps")
                }
            }
            if let claim = method.claim(about: event, ctx.probe) {
                ctx.note(claim.text)
                if claim.promisesCoherence && !ctx.findings.isEmpty {
                    ctx.note("FINDING: \(claim.source) says this needs no precaution on this kernel, and the case is decoherent")
                }
            }
        }
    }

    public static func scenarios(for pin: PinMethod) -> [Scenario] {
        let scope = pin.coverage
        let anon = scope.anon
        var list: [Scenario] = []
        /// Adds the event's scenario if the pin covers the event and the event fits the pin.
        func add(_ event: LongTermEvent, _ summary: String, _ steps: [String], tags: [String],
                 backings: [Backing]? = nil, needs: SharedNeeds = .none,
                 _ body: @escaping @Sendable (CaseContext, Region, Session) throws -> Void) {
            guard scope.events.contains(event), pin.readOnly || !event.needsReadOnlyPin else { return }
            list.append(Scenario(
                id: "\(pin.id)/\(event.rawValue)", summary: "\(pin.summary): \(summary)",
                steps: steps + (scope.deviceWrites ? ["the device writes 0xd5 through the pin: the parent's mapping must show it"] : []),
                tags: [pin.id, "longterm-pin", pin.readOnly ? "ro-pin" : "rw-pin"] + tags,
                backings: backings ?? (event.onEveryShape ? scope.matrix : anon),
                needs: needs.merged(pin.needs), requires: { pin.unavailable($0) },
                body: { ctx in
                    let session = Session(pin, ctx)
                    try body(ctx, ctx.region, session)
                    try session.finish(event)
                }))
        }
        add(.exclusiveWrite, "pin an exclusive page, then write it",
            ["pin the region", "the parent writes 0xff over it", "read through the pin: must show the write"],
            tags: []) { ctx, region, session in
            let p = try session.pin()
            ctx.parentWrites()
            ctx.notePages("after the write")
            try ctx.expect(p, holds: ctx.parentWrite, meaning: staleMeaning)
        }
        add(.forkParentWrites, "pin, fork() with the child alive, the parent writes",
            ["pin the region", "fork(); the child stays alive", "the parent writes 0xff",
             "read through the pin: must show the parent's write", "the child's view must still hold the original content"],
            tags: ["fork"]) { ctx, region, session in
            let p = try session.pin()
            let report = try ctx.childReport()
            let child = try ctx.fork { c in
                c.checkpoint()
                c.verify(region, holds: ctx.original, report: report)
            }
            try child.awaitCheckpoint()
            ctx.parentWrites()
            ctx.notePages("after the parent's write")
            ctx.notePages("after the parent's write", child: child)
            try ctx.expect(p, holds: ctx.parentWrite, meaning: staleMeaning)
            try child.resume()
            try child.finish()
            try ctx.expect("child mapping", report: report,
                           meaning: "the parent's write reached the child: the child maps the parent's pinned page")
        }
        add(.forkChildWrites, "pin, fork(), the child writes",
            ["pin the region", "fork(); the child writes 0xcc over its view",
             "read through the pin: must still hold the original content", "the parent's mapping must too"],
            tags: ["fork", "leak"]) { ctx, region, session in
            let p = try session.pin()
            let child = try ctx.fork { c in
                c.write(0xCC, to: region)
                c.checkpoint()
            }
            try child.awaitCheckpoint()
            ctx.notePages("after the child's write")
            ctx.notePages("after the child's write", child: child)
            try ctx.expect(p, holds: ctx.original, meaning: "the child's write reached the pinned page: data leaks from the child to the device")
            ctx.expectParent(holds: ctx.original, meaning: "the child's write reached the parent's mapping")
            try child.resume()
            try child.finish()
        }
        add(.pinSharedParentWrites, "fork() first, pin the page while COW-shared, the parent writes",
            ["fork(); the child stays alive", "pin the region in the parent while it is COW-shared",
             "the parent writes 0xff", "read through the pin: must show the write",
             "the child's view must hold the original content"],
            tags: ["fork"]) { ctx, region, session in
            let report = try ctx.childReport()
            let child = try ctx.fork { c in
                c.checkpoint()
                c.verify(region, holds: ctx.original, report: report)
            }
            try child.awaitCheckpoint()
            ctx.notePages("shared, before pin")
            let p = try session.pin()
            ctx.parentWrites()
            ctx.notePages("after the parent's write")
            try ctx.expect(p, holds: ctx.parentWrite, meaning: staleMeaning)
            try child.resume()
            try child.finish()
            try ctx.expect("child mapping", report: report,
                           meaning: "the pin or the parent's write reached the child's page")
        }
        add(.pinPreviouslyShared, "fork() and let the child exit, then pin and write",
            ["fork(); the child exits at once", "pin the previously shared page",
             "the parent writes 0xff", "read through the pin: must show the write"],
            tags: ["fork"]) { ctx, region, session in
            let child = try ctx.fork { _ in }
            try child.finish()
            let p = try session.pin()
            ctx.parentWrites()
            ctx.notePages("after the write")
            try ctx.expect(p, holds: ctx.parentWrite, meaning: staleMeaning)
        }
        add(.mprotectCycleWrite, "pin, mprotect(PROT_READ) then PROT_READ|PROT_WRITE, write",
            ["pin the region", "mprotect(PROT_READ), then mprotect(PROT_READ|PROT_WRITE)",
             "the parent writes 0xff", "read through the pin: must show the write"],
            tags: ["mprotect"]) { ctx, region, session in
            let p = try session.pin()
            try region.mprotect(Int32(CP_PROT_READ))
            try region.mprotect(Int32(CP_PROT_READ_WRITE))
            ctx.parentWrites()
            ctx.notePages("after the write")
            try ctx.expect(p, holds: ctx.parentWrite, meaning: staleMeaning)
        }
        let unswapped = anon.filter { !$0.tags.contains("swap") }
        add(.pageoutWrite, "pin, MADV_PAGEOUT (reclaim), then write",
            ["pin the region", "madvise(MADV_PAGEOUT): reclaim must not take the pinned pages from the process",
             "the parent writes 0xff", "read through the pin: must show the write"],
            tags: ["swap", "reclaim"], backings: unswapped.filter { !$0.tags.contains("hugetlb") }, needs: .swap) { ctx, region, session in
            try SystemState.shared.ensureSwap()
            let p = try session.pin()
            // Given on each CPU in turn unless the page went at once: reclaim gets every chance.
            let firstPageOut = { PageInfo.entry(address: region.base)?.swapped == true }
            try region.pageOut(until: firstPageOut)
            ctx.notePages("after MADV_PAGEOUT")
            let swapped = firstPageOut()
            ctx.note("after MADV_PAGEOUT the first page is \(swapped ? "in swap: the process no longer maps the pinned page" : "still mapped")")
            ctx.parentWrites()
            ctx.notePages("after the write")
            try ctx.expect(p, holds: ctx.parentWrite, meaning: staleMeaning + " (reclaim unmapped a pinned page; the write faulted in another)")
        }
        add(.mremapWrite, "pin, mremap() the range to a new address, write there",
            ["pin the region", "mremap(MREMAP_MAYMOVE|MREMAP_FIXED) it to a new, equally aligned address",
             "the parent writes 0xff at the new address", "read through the pin: must show the write"],
            tags: ["mremap"], backings: unswapped) { ctx, region, session in
            let p = try session.pin()
            do {
                try region.move(alignment: region.size)
            } catch let e as SyscallError where e.errno == EINVAL && region.origin.hasPrefix("hugetlb") {
                throw CaseSkip("mremap() of hugetlb memory is not supported here (EINVAL; added in 5.16)")
            }
            ctx.notePages("after mremap()")
            ctx.parentWrites()
            ctx.notePages("after the write")
            try ctx.expect(p, holds: ctx.parentWrite, meaning: staleMeaning + " (mremap() moved the mapping onto other pages)")
        }
        add(.ksmMergePinned, "pin, offer the pages to KSM next to identical ones, then write",
            ["pin the region", "map two more copies of its content; MADV_MERGEABLE on all three; ksmd runs without sleeping",
             "wait (bounded) until ksmd merged the two copies, then for two more full scans",
             "the pinned pages must not have been merged (KSM skips pinned pages)", "stop ksmd",
             "the parent writes 0xff", "read through the pin: must show the write"],
            tags: ["ksm"], backings: Backing.standard, needs: KSM.needs) { ctx, region, session in
            try KSM.start(ctx)
            let p = try session.pin()
            let twins = try KSM.twins(of: region)
            try region.madvise(Int32(CP_MADV_MERGEABLE), name: "MADV_MERGEABLE")
            try KSM.awaitMerged(twins[0], what: "the unpinned copies")
            try KSM.awaitFullScans(2)
            ctx.notePages("after ksmd merged the copies and scanned twice more")
            let merged = KSM.merged(region) == true
            ctx.note("the pinned pages are \(merged ? "KSM pages: ksmd merged pinned pages" : "not merged")")
            try KSM.stop()
            ctx.parentWrites()
            ctx.notePages("after the write")
            try ctx.expect(p, holds: ctx.parentWrite, meaning: staleMeaning + (merged ? " (ksmd merged the pinned page away from the process)" : ""))
        }
        for (advice, name, childSees) in [(Int32(CP_MADV_DONTFORK), "dontfork", "does not map the region"),
                                          (Int32(CP_MADV_WIPEONFORK), "wipeonfork", "maps zeroes")] {
            let madv = "MADV_\(name.uppercased())"
            let event: LongTermEvent = name == "dontfork" ? .dontforkParentWrites : .wipeonforkParentWrites
            add(event, "\(madv) control: pin, fork() (the child \(childSees)), the parent writes",
                ["madvise(\(madv)) on the region", "pin the region", "fork(); the child stays alive (it \(childSees))",
                 "the parent writes 0xff", "read through the pin: must show the write (on every kernel)"]
                + (name == "wipeonfork" ? ["the child's view must be zeroes"] : []),
                // WIPEONFORK is for private anonymous memory only: not hugetlb.
                tags: ["fork", "control", name],
                backings: name == "wipeonfork" ? anon.filter { !$0.tags.contains("hugetlb") } : anon) { ctx, region, session in
                try check("madvise(\(madv))", cp_madvise(region.base, region.size, advice))
                let p = try session.pin()
                let report = try ctx.childReport()
                let child = try ctx.fork { c in
                    c.checkpoint()
                    if advice == Int32(CP_MADV_WIPEONFORK) { c.verify(region, holds: .zero, report: report) }
                }
                try child.awaitCheckpoint()
                ctx.parentWrites()
                ctx.notePages("after the parent's write")
                try ctx.expect(p, holds: ctx.parentWrite, meaning: staleMeaning + ", although the region is \(madv)")
                try child.resume()
                try child.finish()
                if advice == Int32(CP_MADV_WIPEONFORK) {
                    try ctx.expect("child mapping", report: report, meaning: "MADV_WIPEONFORK did not give the child zeroes")
                }
            }
        }
        add(.unpopulatedWrite, "pin memory never written (unpopulated or the zeropage), then write",
            ["map memory and do not write it (never touched, or read: the zeropage is mapped)",
             "pin the region", "the parent writes 0xff", "read through the pin: must show the write"],
            tags: ["zeropage"], backings: [.anonUnpopulated, .anonZeropage, .thpZeropage]) { ctx, region, session in
            let p = try session.pin()
            ctx.parentWrites()
            ctx.notePages("after the write")
            try ctx.expect(p, holds: ctx.parentWrite, meaning: "the pin still holds the zeropage (or another page) the process no longer maps: a device reads zeroes, not the data")
        }
        add(.pagecacheWrite, "pin a file page in a MAP_PRIVATE mapping before its first write, then write",
            ["map a file page (memfd, tmpfs, ext4, hugetlbfs) MAP_PRIVATE and read it (the pagecache page is mapped)",
             "pin the region", "the parent writes 0xff (COW: an anonymous copy)",
             "read through the pin: must show the write"],
            tags: ["pagecache"], backings: scope.pagecache) { ctx, region, session in
            let p = try session.pin()
            ctx.parentWrites()
            ctx.notePages("after the write")
            try ctx.expect(p, holds: ctx.parentWrite, meaning: "the pin still holds the pagecache page while the process writes its private copy: a device reads the file, not the data")
        }
        add(.pinROExclusive, "R/O pin of an exclusive page mapped R/O, then write",
            ["mprotect(PROT_READ)", "pin the region (R/O)", "mprotect(PROT_READ|PROT_WRITE)",
             "the parent writes 0xff", "read through the pin: must show the write"],
            tags: ["mprotect"]) { ctx, region, session in
            try region.mprotect(Int32(CP_PROT_READ))
            let p = try session.pin()
            try region.mprotect(Int32(CP_PROT_READ_WRITE))
            ctx.parentWrites()
            ctx.notePages("after the write")
            try ctx.expect(p, holds: ctx.parentWrite, meaning: staleMeaning)
        }
        return list
    }
}

/// The long-term pin events, in catalog order. What each one checks is its
/// scenario in `LongTermPinCases`; a pin method lists those it runs in its
/// `PinCoverage`.
public enum LongTermEvent: String, CaseIterable, Sendable {
    case exclusiveWrite = "exclusive-write"
    case forkParentWrites = "fork-parent-writes"
    case forkChildWrites = "fork-child-writes"
    case pinSharedParentWrites = "pin-shared-parent-writes"
    case pinPreviouslyShared = "pin-previously-shared"
    case mprotectCycleWrite = "mprotect-cycle-write"
    case pageoutWrite = "pageout-write"
    case mremapWrite = "mremap-write"
    case ksmMergePinned = "ksm-merge-pinned"
    case dontforkParentWrites = "dontfork-parent-writes"
    case wipeonforkParentWrites = "wipeonfork-parent-writes"
    case unpopulatedWrite = "unpopulated-write"
    case pagecacheWrite = "pagecache-write"
    case pinROExclusive = "pin-ro-exclusive"

    /// The events kselftest mm/cow.c runs on every THP shape and the KSM
    /// page: they run on the pin's `PinCoverage.matrix` backings.
    public var onEveryShape: Bool {
        [.forkParentWrites, .pinSharedParentWrites, .pinPreviouslyShared, .mprotectCycleWrite, .pinROExclusive].contains(self)
    }

    /// The event fork()s while the region is pinned (or was shared with a child).
    public var forks: Bool {
        [.forkParentWrites, .forkChildWrites, .pinSharedParentWrites, .pinPreviouslyShared,
         .dontforkParentWrites, .wipeonforkParentWrites].contains(self)
    }

    /// Only a R/O pin can take this path (a R/W pin always unshares first).
    public var needsReadOnlyPin: Bool { self == .pinROExclusive }

    /// Where a R/O pin takes its own path: the kernel must unshare a page
    /// that may be shared (after fork(), a KSM page).
    public static let roUnshare: Set<LongTermEvent> = [.pinSharedParentWrites, .pinPreviouslyShared, .pinROExclusive]
    /// What only a long-term R/O pin must do: break COW of the zeropage or
    /// of a pagecache page before pinning (6.2).
    public static let roLongterm: Set<LongTermEvent> = [.unpopulatedWrite, .pagecacheWrite]
}
