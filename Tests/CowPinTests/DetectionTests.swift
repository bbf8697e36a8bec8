import CCowPin
import CowPin
import Testing

/// The failure path, on the real kernel: situations where the pin and the
/// mapping really diverge must come out decoherent, with evidence; a stuck
/// or crashing child must come out as a harness error, bounded in time.
@Suite(.serialized)
struct DetectionTests {
    let runner = Runner(options: RunOptions(timeoutMs: 2000))

    /// MADV_DONTNEED drops the pinned page from the page table: the next write
    /// faults in a new page while io_uring keeps the old one. This is how
    /// Linux behaves by design, so it must always be reported as decoherent.
    static let droppedPin = Scenario(
        id: "selftest/iouring-fixed-dontneed", summary: "pin, MADV_DONTNEED, write",
        steps: ["pin", "MADV_DONTNEED", "write"], tags: ["selftest"],
        requires: { IoUringFixedPin().unavailable($0) }
    ) { ctx in
        let p = try IoUringFixedPin().pin(ctx.region, in: ctx)
        ctx.notePages("when pinned")
        try ctx.region.madvise(Int32(CP_MADV_DONTNEED), name: "MADV_DONTNEED")
        ctx.parentWrites()
        ctx.notePages("after the write")
        try ctx.expect(p, holds: ctx.parentWrite, meaning: "the pin kept the dropped page")
    }

    @Test("a pin that lost its page is decoherent, with evidence", arguments: ["anon-page", "thp-pmd"])
    func droppedPinIsDecoherent(_ backingID: String) throws {
        let backing = try #require(Backing.standard.first { $0.id == backingID })
        let c = Case(scenario: Self.droppedPin, backing: backing)
        let verdict = runner.run(c).verdict
        if case .skip(let reason) = verdict {
            recordSkip("\(reason)")
            return
        }
        guard case .decoherent(let e) = verdict else {
            Issue.record("expected decoherent, got \(verdict)")
            return
        }
        let f = try #require(e.findings.first)
        #expect(f.view.contains("io_uring"))
        #expect(f.expected == "the parent's write (0xff)")
        let pageSize = Int(cp_page_size())
        let size = backingID == "anon-page" ? pageSize : 2 << 20
        // The original pattern holds 0xff by chance at a few offsets: exactly
        // the other bytes differ.
        let original = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 8)
        defer { original.deallocate() }
        Content.original(seed: c.seed).materialize(into: original)
        #expect(f.differingBytes == original.reduce(0) { $0 + ($1 == 0xFF ? 0 : 1) })
        #expect(f.differingPages == size / pageSize)
        let r = try #require(f.ranges.first)
        #expect(r.offset == 0 && r.length == size)
        #expect(r.seenIs == "the original content")
        #expect(r.expectedBytes.hasPrefix("ff ff ff"))
        // Root sees the frames: the pinned one differs from the one mapped after the write.
        if Probe.isRoot {
            let pinned = e.pages.first { $0.step == "when pinned" && $0.page == 0 }?.pfn
            let mapped = e.pages.first { $0.step == "after the write" && $0.page == 0 }?.pfn
            #expect(pinned != nil && mapped != nil && pinned != mapped)
        }
    }

    /// Reading an io_uring pin twice, with a different content in between:
    /// the second view must show the new content, not what the first read
    /// left in the (reused) file the view is read through.
    static let pinReadTwice = Scenario(
        id: "selftest/iouring-fixed-read-twice", summary: "pin, write, read, write, read",
        steps: [], tags: ["selftest"], requires: { IoUringFixedPin().unavailable($0) }
    ) { ctx in
        let p = try IoUringFixedPin().pin(ctx.region, in: ctx)
        ctx.parentWrites()
        try ctx.expect(p, holds: ctx.parentWrite, meaning: "the first view is wrong")
        ctx.parentWrites(.zero)
        try ctx.expect(p, holds: .zero, meaning: "the second view is stale")
        ctx.parentWrites(ctx.original)
        try ctx.expect(p, holds: ctx.childWrite, meaning: "the third view is expected to differ")
    }

    @Test("every read of a pin is a fresh one: a changed page shows, and a wrong expectation is found")
    func pinReadTwice() throws {
        let v = runner.run(Case(scenario: Self.pinReadTwice, backing: .anonPage)).verdict
        if case .skip(let reason) = v {
            recordSkip("\(reason)")
            return
        }
        guard case .decoherent(let e) = v else {
            Issue.record("expected decoherent, got \(v)")
            return
        }
        // Only the third expectation fails, and the view holds the original content.
        #expect(e.findings.map(\.meaning) == ["the third view is expected to differ"])
        #expect(e.findings.first?.ranges.first?.seenIs == "the original content")
    }

    /// O_DIRECT read held by cowpin's FUSE server, then MADV_DONTNEED: the
    /// reply lands in the dropped page, the parent sees zeroes. Proves the
    /// hold keeps the pages pinned across whatever the case does meanwhile.
    static let droppedRead = Scenario(
        id: "selftest/odirect-read-dontneed", summary: "held read, MADV_DONTNEED", steps: [], tags: ["selftest"],
        requires: { ODirectCases.requirement($0) }
    ) { ctx in
        let server = try ctx.fuseServer()
        let fd = try ctx.open(server)
        let half = ctx.region.pageSize / 2
        server.holdNextRead()
        let io = try Submitter.thread.start(write: false, fd: fd, address: ctx.region.base, length: half, ring: nil)
        try server.awaitHeldRead()
        try ctx.region.madvise(Int32(CP_MADV_DONTNEED), name: "MADV_DONTNEED")
        try server.releaseRead()
        _ = try io.complete(timeoutMs: ctx.timeoutMs)
        ctx.expect("parent mapping", holds: server.readData, seen: UnsafeRawBufferPointer(rebasing: ctx.region.bytes[0..<half]),
                   meaning: "the read's data went to the dropped page")
    }

    /// The odirect-write pin (an O_DIRECT write queued at the closed gate),
    /// then MADV_DONTNEED and a write by the parent: the server must get the
    /// old content, copied from the pinned page when the gate opens.
    static let droppedWrite = Scenario(
        id: "selftest/odirect-write-dontneed", summary: "queued write, MADV_DONTNEED, parent writes", steps: [],
        tags: ["selftest"], requires: { ODirectWritePin().unavailable($0) }
    ) { ctx in
        let p = try ODirectWritePin().pin(ctx.region, in: ctx)
        try ctx.region.madvise(Int32(CP_MADV_DONTNEED), name: "MADV_DONTNEED")
        ctx.parentWrites()
        try ctx.expect(p, holds: ctx.parentWrite, meaning: "the write's data came from the dropped page")
        #expect(throws: HarnessError.self) { try p.withView { _ in } }
    }

    @Test("a held O_DIRECT read and a queued O_DIRECT write really keep their pages pinned",
          arguments: ["anon-page", "thp-pmd"])
    func heldIOIsPinned(_ backingID: String) throws {
        let backing = try #require(Backing.standard.first { $0.id == backingID })
        let pageSize = Int(cp_page_size())
        // The read fills half of page 0; the write pin covers one FUSE request.
        let size = backingID == "anon-page" ? pageSize : 2 << 20
        for (s, seenIs, length) in [(Self.droppedRead, "zeroes", pageSize / 2),
                                    (Self.droppedWrite, "the original content", min(size, ODirectWritePin.pinnedBytes))] {
            let v = runner.run(Case(scenario: s, backing: backing)).verdict
            if case .skip(let reason) = v {
                recordSkip("\(reason)")
                continue
            }
            guard case .decoherent(let e) = v, let f = e.findings.first, let r = f.ranges.first else {
                Issue.record("\(s.id) on \(backingID): expected decoherent, got \(v)")
                continue
            }
            #expect(r.offset == 0 && r.seenIs == seenIs, "\(s.id) on \(backingID): \(r)")
            // The pattern may hold the expected byte by chance at a few offsets.
            #expect(f.differingBytes > length * 9 / 10 && f.differingBytes <= length, "\(s.id) on \(backingID): \(f.differingBytes)")
        }
    }

    /// An RDMA memory region whose page the process dropped (MADV_DONTNEED):
    /// the responder's RDMA READ still finds the old page, and an RDMA WRITE
    /// lands there, not in the page the process maps now.
    static func droppedRegion(writable: Bool) -> Scenario {
        let pin = RDMAPin(writable: writable)
        return Scenario(
            id: "selftest/\(pin.id)-dontneed", summary: "register, MADV_DONTNEED, write", steps: [], tags: ["selftest"],
            requires: { pin.unavailable($0) }
        ) { ctx in
            let p = try pin.pin(ctx.region, in: ctx)
            try ctx.region.madvise(Int32(CP_MADV_DONTNEED), name: "MADV_DONTNEED")
            ctx.parentWrites()
            try ctx.expect(p, holds: ctx.parentWrite, meaning: "the memory region kept the dropped page")
            if writable {
                let device = Content.written(0xD5, by: "the device")
                try p.deviceWrite(device)
                ctx.expect("parent mapping, after the device's write", holds: device, seen: ctx.region.bytes,
                           meaning: "the device wrote the dropped page")
            }
        }
    }

    @Test("an RDMA memory region that lost its page is decoherent, read and written", arguments: [false, true])
    func droppedRegionIsDecoherent(_ writable: Bool) throws {
        let verdict = runner.run(Case(scenario: Self.droppedRegion(writable: writable), backing: .anonPage)).verdict
        if case .skip(let reason) = verdict {
            recordSkip("\(reason)")
            return
        }
        guard case .decoherent(let e) = verdict else {
            Issue.record("expected decoherent, got \(verdict)")
            return
        }
        #expect(e.findings.map(\.view) == ["device (RDMA READ of the memory region by the responder, into a separate scratch region)"]
            + (writable ? ["parent mapping, after the device's write"] : []))
        #expect(e.findings.first?.ranges.first?.seenIs == "the original content")
        #expect(e.notes.contains { $0.hasPrefix("RDMA READ: the responder read \(cp_page_size()) bytes") })
    }

    /// An io_uring pin whose page the process then drops (MADV_DONTNEED, the
    /// content written again), offered by a library that claims fork() needs
    /// no precaution: its fork case is decoherent, and the report says the
    /// claim and that the case contradicts it.
    struct DroppingPin: PinMethod {
        var id: String { "selftest-dropping" }
        var summary: String { "io_uring fixed buffer, then MADV_DONTNEED" }
        var readOnly: Bool { false }
        var coverage: PinCoverage { PinCoverage(events: [.forkParentWrites], anon: [.anonPage], matrix: [.anonPage]) }
        func unavailable(_ probe: Probe) -> String? { IoUringFixedPin().unavailable(probe) }
        func pin(_ region: Region, in ctx: CaseContext) throws -> Pin {
            let p = try IoUringFixedPin().pin(region, in: ctx)
            try region.madvise(Int32(CP_MADV_DONTNEED), name: "MADV_DONTNEED")
            region.fill(ctx.original)
            return p
        }
        func claim(about event: LongTermEvent, _ probe: Probe) -> PinClaim? {
            PinClaim(source: "the test library", text: "the test library: fork() is safe here", promisesCoherence: true)
        }
    }

    @Test("a library's claim is noted beside a fork case, and a decoherent case that contradicts it says so")
    func contradictedClaim() throws {
        let scenarios = LongTermPinCases.scenarios(for: DroppingPin())
        #expect(scenarios.map(\.id) == ["selftest-dropping/fork-parent-writes"])
        let verdict = runner.run(Case(scenario: try #require(scenarios.first), backing: .anonPage)).verdict
        if case .skip(let reason) = verdict {
            recordSkip("\(reason)")
            return
        }
        guard case .decoherent(let e) = verdict else {
            Issue.record("expected decoherent, got \(verdict)")
            return
        }
        #expect(e.notes.contains("the test library: fork() is safe here"))
        #expect(e.notes.contains { $0.hasPrefix("FINDING: the test library says") })
    }

    static func scenario(_ id: String, _ body: @escaping @Sendable (CaseContext) throws -> Void) -> Scenario {
        Scenario(id: "selftest/\(id)", summary: id, steps: [], tags: ["selftest"], body: body)
    }

    func verdict(_ s: Scenario) -> Verdict {
        runner.run(Case(scenario: s, backing: .anonPage)).verdict
    }

    @Test("a child that never reaches its checkpoint is an error within the bound")
    func stuckChild() throws {
        let s = Self.scenario("stuck") { ctx in
            let never = try OSPipe()
            let child = try ctx.fork { c in
                c.wait(for: never, timeoutMs: 60_000)
                c.checkpoint()
            }
            try child.awaitCheckpoint()
        }
        let start = ContinuousClock.now
        let v = verdict(s)
        let elapsed = ContinuousClock.now - start
        guard let message = errorMessage(v) else { return }
        #expect(message.contains("did not reach its checkpoint within 2000 ms (killed)"))
        // Bounded by the case's 2 s timeout, not the child's own 60 s wait.
        #expect(elapsed < .seconds(30))
    }

    @Test("a child killed by a signal is an error naming the signal")
    func crashingChild() {
        let s = Self.scenario("crash") { ctx in
            let region = ctx.region!
            try region.mprotect(Int32(CP_PROT_READ))
            let child = try ctx.fork { c in c.write(0xCC, to: region) }
            try child.finish()
        }
        guard let message = errorMessage(verdict(s)) else { return }
        #expect(message.contains("SIGSEGV"))
    }

    @Test("a failing step in the child is an error naming the step and errno")
    func failingChildStep() {
        let s = Self.scenario("badstep") { ctx in
            let region = ctx.region!
            let child = try ctx.fork { c in
                c.unmap(region)
                c.mprotect(region, Int32(CP_PROT_READ))
            }
            try child.finish()
        }
        guard let message = errorMessage(verdict(s)) else { return }
        #expect(message.contains("mprotect") && message.contains("ENOMEM"))
    }

    @Test("a case that throws CaseSkip is skipped with its reason")
    func skipReason() {
        let s = Self.scenario("skip") { _ in throw CaseSkip("needs a unicorn") }
        #expect(verdict(s) == .skip(reason: "needs a unicorn"))
    }
}
