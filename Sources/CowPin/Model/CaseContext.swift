/// Everything a running case uses: its memory, its children, the expected
/// contents, and the findings it records. Cleans up after itself.
public final class CaseContext {
    public let caseID: String
    public let probe: Probe
    /// Bound for every wait in the case (ms).
    public let timeoutMs: Int32
    /// The case's initial content (a backing that cannot hold it, like the
    /// zeropage, sets what it holds instead).
    public internal(set) var original: Content
    public let parentWrite = Content.written(0xFF, by: "the parent")
    public let childWrite = Content.written(0xCC, by: "the child")
    /// The memory under test, filled with `original` by the backing.
    public internal(set) var region: Region!

    var findings: [Finding] = []
    /// A policy fact the case observed (a pin taken or refused): reported
    /// beside the verdict, never as a finding.
    public var policy: PolicyObservation?
    var pages: [PageSnapshot] = []
    var notes: [String] = []
    private var cleanups: [() -> Void] = []

    init(case c: Case, probe: Probe, timeoutMs: Int32) {
        caseID = c.id
        self.probe = probe
        self.timeoutMs = timeoutMs
        original = .original(seed: c.seed)
    }

    /// Every content a view could plausibly hold, to name what it holds.
    public var candidates: [Content] { [original, parentWrite, childWrite] + extraCandidates + [.zero] }

    /// Runs `body` when the case ends, however it ends (last registered, first run).
    public func onCleanup(_ body: @escaping () -> Void) { cleanups.append(body) }

    func cleanup() {
        while let c = cleanups.popLast() { c() }
        region?.release()
        SystemState.shared.restore(caseOnly: true)
    }

    /// fork(); the child runs the program `build` writes. Killed and reaped
    /// when the case ends if the case did not finish it.
    public func fork(_ build: (inout ChildProgram) throws -> Void) throws -> Child {
        let child = try Child(timeoutMs: timeoutMs, build)
        onCleanup { child.kill() }
        return child
    }

    /// A report a child makes on its view of the region (`ChildProgram.verify`).
    public func childReport() throws -> ChildReport { try ChildReport(size: region.size, pageSize: region.pageSize) }

    /// The parent writes `content` (default: its 0xff) over the region, or over `range` of it.
    public func parentWrites(_ content: Content? = nil, range: Range<Int>? = nil) {
        region.fill(content ?? parentWrite, range: range)
    }

    /// Records a finding when `seen` does not hold `expected`.
    public func expect(_ view: String, holds expected: Layout, seen: UnsafeRawBufferPointer, at offset: Int = 0, meaning: String) {
        if let f = Comparison.compare(view: view, seen: seen, expected: expected, candidates: candidates,
                                      meaning: meaning, pageSize: region.pageSize, offset: offset) {
            findings.append(f)
        }
    }

    /// Records a finding when the child reported that its view did not hold
    /// what `ChildProgram.verify` said it should; a child that made no report
    /// (it died, or never got that far) is an error, never a pass.
    public func expect(_ view: String, report: ChildReport, meaning: String) throws {
        guard let expected = report.expected else { throw HarnessError("no child was asked to report on the \(view)") }
        switch report.outcome {
        case .none: throw HarnessError("the child made no report on the \(view): it died or did not get that far")
        case .matches: return
        case .copied(let seen): expect(view, holds: expected, seen: seen, at: report.range.lowerBound, meaning: meaning)
        }
    }

    /// What the pin sees (its observed range) must hold `expected`.
    public func expect(_ pin: Pin, holds expected: Content, meaning: String) throws {
        try pin.withView { expect(pin.view, holds: Layout(expected), seen: $0, at: pin.observed.lowerBound, meaning: meaning) }
    }

    public func expect(_ view: String, holds expected: Content, seen: UnsafeRawBufferPointer, meaning: String) {
        expect(view, holds: Layout(expected), seen: seen, meaning: meaning)
    }

    public func expect(_ view: String, holds expected: Content, seen: [UInt8], meaning: String) {
        seen.withUnsafeBytes { expect(view, holds: Layout(expected), seen: $0, meaning: meaning) }
    }

    /// The parent's own mapping must hold `expected`.
    public func expectParent(holds expected: Content, meaning: String) {
        expectParent(holds: Layout(expected), meaning: meaning)
    }

    public func expectParent(holds expected: Layout, meaning: String) {
        expect("parent mapping", holds: expected, seen: region.bytes, meaning: meaning)
    }

    /// A line of evidence the case wants in its report (what the kernel did).
    public func note(_ line: String) { notes.append(line) }

    /// For hugetlb regions: how many huge pages of the region's size are free
    /// now (a COW that did not take a free page shows here).
    public func noteHugetlbPool(_ step: String) {
        guard region.origin.hasPrefix("hugetlb") else { return }
        let dir = "/sys/kernel/mm/hugepages/hugepages-\(region.size / 1024)kB"
        func value(_ f: String) -> String { readFile("\(dir)/\(f)")?.trimmed ?? "?" }
        note("\(step): \(value("free_hugepages")) free, \(value("resv_hugepages")) reserved of \(value("nr_hugepages")) \(region.size / 1024) KiB huge pages")
    }

    /// Other contents a view could hold in this case (e.g. a file server's data).
    public var extraCandidates: [Content] = []

    /// Records the frame the parent (or `child`) maps at the region's first
    /// and last page, for evidence.
    public func notePages(_ step: String, child: Child? = nil) {
        let who = child.map { "child \($0.pid)" } ?? "parent"
        let last = region.pages - 1
        for page in last > 0 ? [0, last] : [0] {
            pages.append(PageInfo.snapshot(step: step, who: who, pid: child?.pid, region: region, page: page))
        }
    }

    var evidence: Evidence { Evidence(findings: findings, pages: pages, notes: notes) }
}
