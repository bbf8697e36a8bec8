import CCowPin
import CowPin
import Glibc
import Testing

/// File backings and long-term pins of file mappings, on the real kernel.
@Suite(.serialized)
struct FileTests {
    let runner = Runner(options: RunOptions(timeoutMs: 5000))

    /// Runs a catalog case as a kernel of `release` (the real kernel answers,
    /// the case compares the answer with that release's rule).
    func verdict(_ id: String, asRelease release: String? = nil) throws -> Verdict {
        let c = try #require(Catalog.find(id))
        var probe = Probe.current()
        if let release { probe.kernel.release = release }
        return Runner(probe: probe, options: runner.options).run(c).verdict
    }

    @Test("upstream's rule for io_uring fixed buffers in file mappings, by version")
    func intentTable() {
        typealias F = FileSystem
        func answer(_ release: String, _ fs: UInt64, shared: Bool) -> String {
            FilePinningCases.intent(release: release, fileSystem: fs, shared: shared).answer
        }
        #expect(answer("6.18.44-fc-v769", F.ext4, shared: true) == "the pin refused (EFAULT)")
        #expect(answer("6.5.0", F.ext4, shared: false) == "the pin taken")
        #expect(answer("6.18.0", F.tmpfs, shared: true) == "the pin taken")
        #expect(answer("6.1.0-56-amd64", F.ext4, shared: true) == "the pin refused (EOPNOTSUPP)")
        #expect(answer("6.1.0-56-amd64", F.ext4, shared: false) == "the pin refused (EOPNOTSUPP)")
        #expect(answer("6.1.0-56-amd64", F.tmpfs, shared: true) == "the pin taken")
        #expect(answer("5.10.0", F.tmpfs, shared: false) == "the pin refused (EOPNOTSUPP)")
        for release in ["5.4.0", "6.1.0", "6.18.0"] {
            #expect(answer(release, F.hugetlbfs, shared: true) == "the pin taken")
        }
        #expect(FilePinningCases.intent(release: "6.18.0", fileSystem: F.ext4, shared: true).because
            .contains("upstream refuses R/W long-term pins of ext4 shared mappings since 6.5"))
    }

    /// The case is coherent on the running kernel (its answer is upstream's);
    /// run as a kernel on the other side of the rule, it must be decoherent,
    /// and its evidence shows what this kernel answered.
    func answer(_ id: String, otherSide release: String) throws -> (notes: [String], finding: Finding)? {
        let real = try verdict(id)
        if case .skip(let reason) = real {
            recordSkip("\(id): \(reason)")
            return nil
        }
        #expect(real == .coherent, "\(id) on the running kernel: \(real)")
        let other = try verdict(id, asRelease: release)
        guard case .decoherent(let e) = other, let f = e.findings.first else {
            Issue.record("\(id) as \(release): expected decoherent, got \(other)")
            return nil
        }
        return (e.notes, f)
    }

    @Test("a shared ext4 mapping: io_uring refuses the pin (EFAULT since 6.5, EOPNOTSUPP before)")
    func ext4SharedRefused() throws {
        let release = Probe.current().kernel.release
        let newRule = KernelVersion(release)! >= KernelVersion("6.5")!
        let want = FilePinningCases.intent(release: release, fileSystem: FileSystem.ext4, shared: true)
        #expect(!want.taken)
        guard let (notes, f) = try answer("longterm-file/iouring-fixed-shared/ext4", otherSide: newRule ? "6.1.0" : "6.5.0") else { return }
        #expect(notes.contains("pin refused: \(newRule ? "EFAULT" : "EOPNOTSUPP")"), "\(notes)")
        #expect(f.view.contains("IORING_REGISTER_BUFFERS") && f.view.contains("ext4"))
        #expect(f.meaning.hasPrefix("refused with \(newRule ? "EFAULT" : "EOPNOTSUPP"), but upstream"), "\(f.meaning)")
    }

    @Test("a shared tmpfs mapping: io_uring takes the pin, and the pin sees the process's write")
    func tmpfsSharedTaken() throws {
        // Before 5.14 io_uring refused shmem buffers: as that kernel, the pin taken is the finding.
        guard let (notes, f) = try answer("longterm-file/iouring-fixed-shared/tmpfs", otherSide: "5.10.0") else { return }
        #expect(notes.contains("pin taken"), "\(notes)")
        #expect(f.expected == "the pin refused (EOPNOTSUPP)")
        #expect(f.meaning.hasPrefix("taken, but upstream io_uring refuses"), "\(f.meaning)")
    }

    @Test("a private ext4 mapping: the pin is taken since 6.5 (an anonymous copy), refused before")
    func ext4PrivateByVersion() throws {
        let release = Probe.current().kernel.release
        let newRule = KernelVersion(release)! >= KernelVersion("6.5")!
        guard let (notes, f) = try answer("longterm-file/iouring-fixed-private/ext4", otherSide: newRule ? "6.1.0" : "6.5.0") else { return }
        #expect(notes.contains(newRule ? "pin taken" : "pin refused: EOPNOTSUPP"), "\(notes)")
        #expect(f.meaning.hasPrefix(newRule ? "taken, but" : "refused (EOPNOTSUPP) although"), "\(f.meaning)")
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
