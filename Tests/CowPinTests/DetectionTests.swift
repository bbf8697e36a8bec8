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
        ctx.expect(p.view, holds: ctx.parentWrite, seen: try p.read(), meaning: "the pin kept the dropped page")
    }

    @Test("a pin that lost its page is decoherent, with evidence", arguments: ["anon-page", "thp-pmd"])
    func droppedPinIsDecoherent(_ backingID: String) throws {
        let backing = try #require(Backing.standard.first { $0.id == backingID })
        let c = Case(scenario: Self.droppedPin, backing: backing)
        let verdict = runner.run(c).verdict
        if case .skip(let reason) = verdict {
            Issue.record(Comment(rawValue: "SKIP: \(reason)"), severity: .warning)
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
        guard case .error(let message) = v else {
            Issue.record("expected error, got \(v)")
            return
        }
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
        guard case .error(let message) = verdict(s) else {
            Issue.record("expected error")
            return
        }
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
        guard case .error(let message) = verdict(s) else {
            Issue.record("expected error")
            return
        }
        #expect(message.contains("mprotect") && message.contains("ENOMEM"))
    }

    @Test("a case that throws CaseSkip is skipped with its reason")
    func skipReason() {
        let s = Self.scenario("skip") { _ in throw CaseSkip("needs a unicorn") }
        #expect(verdict(s) == .skip(reason: "needs a unicorn"))
    }
}
