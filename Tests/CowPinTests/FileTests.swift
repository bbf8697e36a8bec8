import CCowPin
import CowPin
import Glibc
import Testing

/// File backings and long-term pins of file mappings, on the real kernel.
@Suite(.serialized)
struct FileTests {
    let runner = Runner(options: RunOptions(timeoutMs: 5000))

    static var history: ExpectedVerdicts { get throws { try ExpectedVerdicts.load(ExpectedVerdicts.defaultPath()) } }

    func result(_ id: String) throws -> CaseResult {
        runner.run(try #require(Catalog.find(id)))
    }

    @Test("upstream's rule for io_uring fixed buffers in file mappings, by release (a policy, from the history file)")
    func policyTable() throws {
        let h = try Self.history
        func answer(_ id: String, _ release: String) -> String? { h.expectedPolicy("longterm-file/\(id)", release: release)?.0.description }
        #expect(answer("iouring-fixed-shared/ext4", "6.18.44-fc-v769") == "refused (EFAULT)")
        #expect(answer("iouring-fixed-private/ext4", "6.5.0") == "taken")
        #expect(answer("iouring-fixed-shared/tmpfs", "6.18.0") == "taken")
        #expect(answer("iouring-fixed-shared/ext4", "6.1.0-56-amd64") == "refused (EOPNOTSUPP)")
        #expect(answer("iouring-fixed-private/ext4", "6.1.0-56-amd64") == "refused (EOPNOTSUPP)")
        #expect(answer("iouring-fixed-shared/memfd", "6.1.0-56-amd64") == "taken")
        // Before 5.14 mainline refused shmem buffers, but stable kernels carry the
        // exemption by backport: history does not judge that policy there.
        #expect(answer("iouring-fixed-private/tmpfs", "5.10.0") == nil)
        #expect(answer("iouring-fixed-private/tmpfs", "5.14.0") == "taken")
        for release in ["5.4.0", "6.1.0", "6.18.0"] {
            #expect(answer("iouring-fixed-shared/memfd-hugetlb-2048k", release) == "taken")
        }
    }

    /// A pin taken or refused is a policy observation beside the verdict: the
    /// verdict is about data, and is never decoherent without a differing byte.
    func policyCase(_ id: String, taken: Bool, errno: String? = nil) throws {
        let r = try result(id)
        if case .skip(let reason) = r.verdict {
            recordSkip("\(id): \(reason)")
            return
        }
        #expect(r.verdict == .coherent, "\(id): \(r.verdict)")
        let p = try #require(r.policy, "\(id) recorded no policy fact")
        #expect(p.allowance == PinAllowance(taken: taken, errno: errno), "\(id): \(p)")
        #expect(p.action.contains("IORING_REGISTER_BUFFERS"))
        // And the running kernel follows upstream's rule for its release.
        let release = runner.probe.kernel.release
        let rule = try #require(try Self.history.expectedPolicy(id, release: release))
        #expect(rule.0 == p.allowance, "\(id) on \(release): \(p), rule: \(rule.1)")
    }

    @Test("a shared ext4 mapping: io_uring refuses the pin (EFAULT since 6.5, EOPNOTSUPP before): a policy fact, coherent")
    func ext4SharedRefused() throws {
        let newRule = KernelVersion(runner.probe.kernel.release)! >= KernelVersion("6.5")!
        try policyCase("longterm-file/iouring-fixed-shared/ext4", taken: false, errno: newRule ? "EFAULT" : "EOPNOTSUPP")
    }

    @Test("a shared tmpfs mapping: io_uring takes the pin, and the pin sees the process's write")
    func tmpfsSharedTaken() throws {
        try policyCase("longterm-file/iouring-fixed-shared/tmpfs", taken: true)
        #expect(try result("longterm-file/iouring-fixed-shared/tmpfs").notes.contains("pin taken"))
    }

    @Test("a private ext4 mapping: the pin is taken since 6.5 (an anonymous copy), refused before")
    func ext4PrivateByVersion() throws {
        let newRule = KernelVersion(runner.probe.kernel.release)! >= KernelVersion("6.5")!
        try policyCase("longterm-file/iouring-fixed-private/ext4", taken: newRule, errno: newRule ? nil : "EOPNOTSUPP")
    }

    @Test("no case is decoherent without a differing byte, and policy facts stay out of the verdict")
    func noDecoherenceWithoutBytes() throws {
        for c in try Selection(filters: ["longterm-file/*", "iouring-fixed/pagecache-write/*"]).select() {
            let r = runner.run(c)
            if let e = r.verdict.evidence {
                #expect(!e.findings.isEmpty && e.findings.allSatisfy { $0.differingBytes > 0 }, "\(c.id): a finding without a differing byte")
            }
            if c.id.hasPrefix("longterm-file/"), r.verdict.kind != .skip {
                #expect(r.policy != nil, "\(c.id) recorded no policy fact")
            }
        }
        // The matrix judges a policy apart: as a kernel whose rule differs, the cell
        // stays expected (coherent) and only its policy mark differs.
        let id = "longterm-file/iouring-fixed-shared/ext4"
        let r = try result(id)
        guard let p = r.policy, r.verdict == .coherent else { return recordSkip("\(id): \(r.verdict)") }
        let other = KernelVersion(runner.probe.kernel.release)! >= KernelVersion("6.5")! ? "6.1.0" : "6.5.0"
        let doc = JSONReporter.Document(
            cowpin: Catalog.version, kernel: Probe.Kernel(release: other, version: "", machine: "x86_64"), euid: 0,
            results: [JSONReporter.Result(id: id, iteration: 1, verdict: .coherent, reason: nil, evidence: nil, durationMs: 0, policy: p)],
            totals: Totals(), exitCode: 0)
        let m = Matrix(expected: try Self.history, runs: [("other", doc)])
        let cell = try #require(m.rows.first?.cells.first)
        #expect(cell.mark == .expected)
        #expect(cell.policyMark == .differs && cell.policyExpected != p.allowance.description, "\(cell)")
    }

    /// As cow/private-file-write, except that the file page itself is written
    /// first (through a MAP_SHARED mapping), as if the private write had
    /// reached the file: the check must report the file's view.
    static let fileWritten = Scenario(
        id: "selftest/file-written-through-shared", summary: "the file is written, then the private mapping",
        steps: [], tags: ["selftest"]
    ) { ctx in
        let view = try FileCOWCases.sharedView(ctx, prot: Int32(CP_PROT_READ_WRITE))
        view.fill(ctx.parentWrite)
        ctx.parentWrites()
        try FileCOWCases.check(ctx, fileView: view)
    }

    @Test("the private-file-write check detects a write that reached the file",
          arguments: ["memfd-private", "tmpfs-private", "ext4-private"])
    func writtenFileIsDecoherent(_ backingID: String) throws {
        let backing = try #require(Backing.privateFiles.first { $0.id == backingID })
        let c = Case(scenario: Self.fileWritten, backing: backing)
        let v = runner.run(c).verdict
        if case .skip(let reason) = v {
            recordSkip(reason)
            return
        }
        guard case .decoherent(let e) = v else {
            Issue.record("expected decoherent, got \(v)")
            return
        }
        #expect(e.findings.count == 1, "\(e.findings.map(\.view))")
        let f = try #require(e.findings.first)
        #expect(f.view == "file (MAP_SHARED view)")
        #expect(f.expected == "the original content")
        let page = Int(cp_page_size())
        let original = UnsafeMutableRawBufferPointer.allocate(byteCount: page, alignment: 8)
        defer { original.deallocate() }
        Content.original(seed: c.seed).materialize(into: original)
        #expect(f.differingBytes == original.reduce(0) { $0 + ($1 == 0xFF ? 0 : 1) })
        #expect(f.ranges.first?.seenIs == "the parent's write (0xff)")
    }
}
