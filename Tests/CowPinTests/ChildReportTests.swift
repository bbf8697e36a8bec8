import CCowPin
import CowPin
import Testing

/// A child checks its own view (`ChildProgram.verify`) and copies it out only
/// when it differs. These cases make the view differ on purpose, or kill the
/// child before it reports: the fast path must never turn that into a pass.
@Suite(.serialized)
struct ChildReportTests {
    let runner = Runner(options: RunOptions(timeoutMs: 2000))

    static func scenario(_ id: String, _ body: @escaping @Sendable (CaseContext) throws -> Void) -> Scenario {
        Scenario(id: "selftest/report-\(id)", summary: id, steps: [], tags: ["selftest"], body: body)
    }

    func run(_ s: Scenario) -> (verdict: Verdict, seed: UInt32) {
        let c = Case(scenario: s, backing: .anonPage)
        return (runner.run(c).verdict, c.seed)
    }

    /// The region's original bytes for `seed`.
    static func original(seed: UInt32, count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        out.withUnsafeMutableBytes { Content.original(seed: seed).materialize(into: $0) }
        return out
    }

    static func hexBytes(_ bytes: ArraySlice<UInt8>) -> String {
        bytes.map { b in String(b >> 4, radix: 16) + String(b & 15, radix: 16) }.joined(separator: " ")
    }

    /// Checks that `verdict` holds exactly one finding on `view`: the bytes of
    /// `range` (region offsets) are `written` instead of the original content.
    func expectOneFinding(_ verdict: Verdict, seed: UInt32, view: String, range: Range<Int>, written: UInt8, seenIs: String) throws {
        guard case .decoherent(let e) = verdict else {
            Issue.record("expected decoherent, got \(verdict)")
            return
        }
        #expect(e.findings.count == 1)
        let f = try #require(e.findings.first)
        #expect(f.view == view)
        let original = Self.original(seed: seed, count: Int(cp_page_size()))
        // The original pattern holds `written` by chance at a few offsets:
        // exactly the other bytes differ, and the finding's range lies inside.
        let differing = original[range].filter { $0 != written }.count
        #expect(f.differingBytes == differing)
        #expect(f.differingPages == 1)
        let r = try #require(f.ranges.first)
        #expect(f.ranges.count == 1)
        #expect(r.offset >= range.lowerBound && r.offset + r.length <= range.upperBound)
        #expect(r.length > range.count - 16)
        #expect(r.seenIs == seenIs)
        #expect(r.seenBytes == Array(repeating: Self.hexBytes([written]), count: min(r.length, 16)).joined(separator: " "))
        #expect(r.expectedBytes == Self.hexBytes(original[r.offset..<(r.offset + min(r.length, 16))]))
    }

    @Test("a child that writes its view before verifying reports the write, at its offsets")
    func childWriteIsFound() throws {
        let s = Self.scenario("child-writes") { ctx in
            let region = ctx.region!
            let report = try ctx.childReport()
            let child = try ctx.fork { c in
                c.write(0xCC, to: region, range: 256..<768)
                c.verify(region, holds: ctx.original, report: report)
            }
            try child.finish()
            try ctx.expect("child mapping", report: report, meaning: "the child's view changed")
        }
        let (v, seed) = run(s)
        try expectOneFinding(v, seed: seed, view: "child mapping", range: 256..<768, written: 0xCC, seenIs: "the child's write (0xcc)")
    }

    @Test("a child whose view holds what it should reports a match")
    func matchingViewPasses() {
        let s = Self.scenario("matches") { ctx in
            let region = ctx.region!
            let report = try ctx.childReport()
            let child = try ctx.fork { c in
                c.write(0xCC, to: region, range: 1024..<2048)
                c.verify(region, holds: Layout(ctx.original).with(ctx.childWrite, at: 1024..<2048), report: report)
            }
            try child.finish()
            guard case .matches = report.outcome else { throw HarnessError("the child did not report a match") }
            try ctx.expect("child mapping", report: report, meaning: "the child's view changed")
        }
        #expect(run(s).verdict == .coherent)
    }

    @Test("overlays are checked stretch by stretch: a write beyond its overlay is found")
    func overlayEdges() throws {
        let s = Self.scenario("overlay") { ctx in
            let region = ctx.region!
            let report = try ctx.childReport()
            let child = try ctx.fork { c in
                c.write(0xCC, to: region, range: 1024..<2048)
                // Later overlays win: 1536..<2048 must hold the original again.
                let layout = Layout(ctx.original).with(ctx.childWrite, at: 1024..<2048).with(ctx.original, at: 1536..<2048)
                c.verify(region, holds: layout, report: report)
            }
            try child.finish()
            try ctx.expect("child mapping", report: report, meaning: "the child's view changed")
        }
        let (v, seed) = run(s)
        try expectOneFinding(v, seed: seed, view: "child mapping", range: 1536..<2048, written: 0xCC, seenIs: "the child's write (0xcc)")
    }

    @Test("a layout of more stretches than the child checks is copied and compared by the parent")
    func manyStretches() throws {
        for skipLast in [false, true] {
            let s = Self.scenario("many-stretches-\(skipLast)") { ctx in
                let region = ctx.region!
                var layout = Layout(ctx.original)
                for i in 0..<Int(CP_MAX_STRETCHES) {
                    layout = layout.with(ctx.parentWrite, at: (i * 48)..<(i * 48 + 16))
                }
                for (n, o) in layout.overlays.enumerated() where !(skipLast && n == layout.overlays.count - 1) {
                    ctx.parentWrites(o.content, range: o.range)
                }
                let report = try ctx.childReport()
                let child = try ctx.fork { c in c.verify(region, holds: layout, report: report) }
                try child.finish()
                guard case .copied = report.outcome else { throw HarnessError("the child did not copy its view") }
                try ctx.expect("child mapping", report: report, meaning: "the child's view changed")
            }
            let (v, seed) = run(s)
            if !skipLast {
                #expect(v == .coherent)
                continue
            }
            let last = (Int(CP_MAX_STRETCHES) - 1) * 48
            guard case .decoherent(let e) = v, let f = e.findings.first, let r = f.ranges.first else {
                Issue.record("expected decoherent, got \(v)")
                continue
            }
            let original = Self.original(seed: seed, count: last + 16)
            #expect(f.differingBytes == original[last...].filter { $0 != 0xFF }.count)
            #expect(r.offset >= last && r.offset + r.length <= last + 16)
            #expect(r.seenIs == "the original content")
        }
    }

    @Test("a child killed before it reports is an error, also on a reused report buffer")
    func killedBeforeReport() {
        let s = Self.scenario("killed") { ctx in
            let region = ctx.region!
            // A report that copied a view that matches leaves a header and
            // data in the buffer that a later report on the same size reuses.
            do {
                var layout = Layout(ctx.original)
                for i in 0...Int(CP_MAX_STRETCHES) { layout = layout.with(ctx.original, at: (i * 32)..<(i * 32 + 8)) }
                let first = try ctx.childReport()
                let child = try ctx.fork { c in c.verify(region, holds: layout, report: first) }
                try child.finish()
                try ctx.expect("first child mapping", report: first, meaning: "the first child's view changed")
            }
            let report = try ctx.childReport()
            let child = try ctx.fork { c in
                c.checkpoint()
                c.verify(region, holds: ctx.original, report: report)
            }
            try child.awaitCheckpoint()
            child.kill()
            try ctx.expect("child mapping", report: report, meaning: "the child's view changed")
        }
        guard let message = errorMessage(run(s).verdict) else { return }
        #expect(message.contains("the child made no report on the child mapping"))
    }

    @Test("a child that dies while checking its view is an error, not a pass")
    func diedWhileReporting() {
        let s = Self.scenario("crashed") { ctx in
            let region = ctx.region!
            let report = try ctx.childReport()
            let child = try ctx.fork { c in
                c.unmap(region)
                c.verify(region, holds: ctx.original, report: report)
            }
            // Whatever finish() says about the child, the report must not pass.
            _ = try? child.finish()
            try ctx.expect("child mapping", report: report, meaning: "the child's view changed")
        }
        guard let message = errorMessage(run(s).verdict) else { return }
        #expect(message.contains("made no report"))
    }

    @Test("what a child reads from a pipe is checked in place: other data is found")
    func pipeReport() throws {
        for parentWrites in [false, true] {
            let s = Self.scenario("pipe-\(parentWrites)") { ctx in
                let region = ctx.region!
                if parentWrites { ctx.parentWrites() }
                let pipes = try SplicePipes(covering: region.size, pageSize: region.pageSize)
                try pipes.splice(region)
                let report = try ctx.childReport()
                let child = try ctx.fork { c in c.verify(pipes, hold: ctx.original, report: report) }
                try child.finish()
                try ctx.expect("pipe", report: report, meaning: "the pipe holds other data")
            }
            let (v, seed) = run(s)
            if parentWrites {
                let size = Int(cp_page_size())
                try expectOneFinding(v, seed: seed, view: "pipe", range: 0..<size, written: 0xFF, seenIs: "the parent's write (0xff)")
            } else {
                #expect(v == .coherent)
            }
        }
    }

    @Test("a pipe that holds less than the child reads is an error")
    func shortPipe() {
        let s = Self.scenario("short-pipe") { ctx in
            let region = ctx.region!
            let pipes = try SplicePipes(covering: region.size, pageSize: region.pageSize)
            // Half of what the child will read, then end of file.
            let n = cp_vmsplice(pipes.pipes[0].writeEnd, region.base, region.size / 2)
            guard n == region.size / 2 else { throw HarnessError("vmsplice moved \(n) bytes") }
            pipes.pipes[0].closeWrite()
            let report = try ctx.childReport()
            let child = try ctx.fork { c in c.verify(pipes, hold: ctx.original, report: report) }
            try child.finish()
            try ctx.expect("pipe", report: report, meaning: "the pipe holds other data")
        }
        guard let message = errorMessage(run(s).verdict) else { return }
        #expect(message.contains("read pipe") && message.contains("ENODATA"))
    }
}
