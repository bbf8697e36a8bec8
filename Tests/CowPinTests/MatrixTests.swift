import CowPin
import Foundation
import Testing

struct MatrixTests {
    static var history: ExpectedVerdicts {
        get throws {
            // The tests run from the package directory.
            try ExpectedVerdicts.load(FileManager.default.currentDirectoryPath + "/data/expected-verdicts.json")
        }
    }

    @Test func kernelVersions() {
        #expect(KernelVersion("6.1.0-56-amd64")?.parts == [6, 1, 0])
        #expect(KernelVersion("6.18.44-fc-v769")?.parts == [6, 18, 44])
        #expect(KernelVersion("5.19") != nil && KernelVersion("5.19")! < KernelVersion("6.1.0-56-amd64")!)
        #expect(KernelVersion("6.9")! > KernelVersion("6.1.0")!)
        #expect(KernelVersion("6.2") == KernelVersion("6.2.0"))
        #expect(KernelVersion("garbage") == nil)
    }

    @Test("every catalog case has a history, every family decides a case, and every rule cites its fixes")
    func historyCoversCatalog() throws {
        let h = try Self.history
        #expect(h.problems.isEmpty, "\(h.problems)")
        for c in Catalog.all { #expect(h.family(of: c.id) != nil, "no history for \(c.id)") }
        for f in h.families {
            #expect(Catalog.all.contains { h.family(of: $0.id)?.cases == f.cases }, "family \(f.cases) decides no case (none matches, or earlier families take them all)")
            // A family that is not coherent everywhere names the change behind each step.
            let steps = f.steps ?? []
            if (f.initially ?? .coherent) != .coherent && steps.isEmpty {
                #expect(f.initially == .xfail, "family \(f.cases) is \(f.initially!.rawValue) on every kernel: only a known-unfixed bug (xfail) may be")
            }
            for s in steps {
                let ch = try #require(h.changes[s.change], "family \(f.cases): step names no change")
                #expect(ch.commit.count >= 12 && KernelVersion(ch.release) != nil, "\(s.change): \(ch.commit) \(ch.release)")
            }
            #expect(!f.history.isEmpty)
        }
        for (key, ch) in h.changes {
            #expect(h.families.contains { ($0.steps ?? []).contains { $0.change == key } }
                    || (h.policies ?? []).contains { ($0.steps ?? []).contains { $0.change == key } }, "change \(key) is cited by no rule")
            #expect(ch.release.split(separator: ".").count == 2, "\(key): a first mainline release is major.minor, not \(ch.release)")
        }
        for c in Catalog.all where c.id.hasPrefix("longterm-file/") { #expect(h.policy(of: c.id) != nil, "no policy rule for \(c.id)") }
    }

    @Test("a history file that cites an unknown change, or a change without a commit id, is refused")
    func badHistoryRefused() throws {
        var h = try Self.history
        h.families[0].steps = [ExpectedVerdicts.Step(change: "no-such-change", becomes: .coherent)]
        #expect(h.problems.contains { $0.contains("unknown change 'no-such-change'") })
        var g = try Self.history
        let key = try #require(g.changes.keys.first)
        g.changes[key]!.commit = "abc"
        #expect(g.problems.contains { $0.contains("is not a commit id") })
    }

    @Test("expectations follow upstream's changes, including behaviour that broke and was fixed again")
    func expectationsByVersion() throws {
        let h = try Self.history
        func e(_ id: String, _ r: String) -> Verdict.Kind? { h.expected(id, release: r) }
        #expect(e("odirect-thread/read-fork-parent-writes/anon-page", "6.1.0-56-amd64") == .decoherent)
        #expect(e("odirect-thread/read-fork-parent-writes/anon-page", "6.18.44") == .coherent)
        #expect(e("odirect-thread/read-dontfork-parent-writes/anon-page", "6.1.0") == .coherent)
        #expect(e("vfio-ro/unpopulated-write/anon-zeropage", "6.1.0") == .decoherent)
        #expect(e("vfio-rw/unpopulated-write/anon-zeropage", "6.1.0") == .coherent)
        #expect(e("cow/fork-parent-writes/anon-page", "5.4.0") == .coherent)
        // fork() copies a pinned page for the child since 5.9: the parent keeps its pin.
        #expect(e("iouring-fixed/fork-parent-writes/anon-page", "5.4.0") == .decoherent)
        #expect(e("iouring-fixed/fork-parent-writes/anon-page", "5.10.0-32-amd64") == .coherent)
        // The write fault after mprotect() copied a pinned page from 5.9 (reuse by
        // refcount) until 5.19 (PageAnonExclusive); 5.4 reused it (mapcount).
        #expect(e("iouring-fixed/mprotect-cycle-write/anon-page", "5.4.0") == .coherent)
        #expect(e("iouring-fixed/mprotect-cycle-write/anon-page", "5.10.0") == .decoherent)
        #expect(e("iouring-fixed/mprotect-cycle-write/anon-page", "5.19.0") == .coherent)
        guard case .verdict(_, let because)? = h.expectation("iouring-fixed/mprotect-cycle-write/anon-page", release: "5.15.0") else {
            Issue.record("no expectation")
            return
        }
        #expect(because.contains("5.9") && because.contains("09854ba94c6a"), "\(because)")
        #expect(h.expectation("cow/fork-parent-writes/anon-page", release: "garbage") == .unknown("the release 'garbage' does not parse as a version"))
    }

    static func doc(_ release: String, _ results: [(String, Verdict.Kind)]) -> JSONReporter.Document {
        JSONReporter.Document(
            cowpin: Catalog.version, kernel: Probe.Kernel(release: release, version: "", machine: "x86_64"), euid: 0,
            results: results.map { JSONReporter.Result(id: $0.0, iteration: 1, verdict: $0.1, reason: nil, evidence: nil, durationMs: 0) },
            totals: Totals(), exitCode: 0)
    }

    @Test func marks() throws {
        let id = "odirect-thread/read-fork-parent-writes/anon-page"
        let m = Matrix(expected: try Self.history, runs: [
            ("old-broken", Self.doc("6.1.0", [(id, .decoherent), ("cow/fork-parent-writes/anon-page", .coherent)])),
            ("old-fixed", Self.doc("6.1.0", [(id, .coherent)])),
            ("new-broken", Self.doc("6.18.0", [(id, .decoherent), ("cow/fork-parent-writes/anon-page", .skip)])),
        ])
        let row = try #require(m.rows.first { $0.id == id })
        #expect(row.cells.map(\.mark) == [.expected, .newlyFixed, .regression])
        let cow = try #require(m.rows.first { $0.id == "cow/fork-parent-writes/anon-page" })
        #expect(cow.cells.map(\.mark) == [.expected, .missing, .skip])
        #expect(m.markdown.contains("**decoherent: REGRESSION**"))
        #expect(m.markdown.contains("**coherent: newly fixed**"))
        #expect(m.count(.regression, column: 2) == 1)
        #expect(row.cells[2].because?.contains("coherent since") == true, "\(row.cells[2].because ?? "")")
    }

    @Test("baseline mode judges each kernel against the base kernel, without history")
    func baselineMarks() throws {
        let a = "iouring-fixed/fork-parent-writes/anon-page", b = "cow/fork-parent-writes/thp-pmd"
        let c = "vmsplice/unmap-in-child/anon-page", d = "cow/fork-child-writes/anon-page"
        let m = Matrix(baseline: "base", runs: [
            ("base", Self.doc("6.18.0", [(a, .coherent), (b, .decoherent), (c, .coherent), (d, .skip)])),
            ("patched", Self.doc("6.18.0", [(a, .decoherent), (b, .coherent), (c, .coherent), (d, .coherent)])),
        ])
        func marks(_ id: String) -> [Matrix.Mark] { m.rows.first { $0.id == id }?.cells.map(\.mark) ?? [] }
        #expect(marks(a) == [.unchanged, .newlyDecoherent])
        #expect(marks(b) == [.unchanged, .newlyCoherent])
        #expect(marks(c) == [.unchanged, .unchanged])
        #expect(marks(d) == [.skip, .unknown])
        #expect(m.markdown.contains("**decoherent: NEWLY DECOHERENT**"))
        #expect(m.markdown.contains("- patched (6.18.0): unchanged 1, newly-decoherent 1, newly-coherent 1, unknown 1"))
    }

    @Test("the summary grid counts each family's cases per backing class and flags what needs a look")
    func summaryGrid() throws {
        #expect(BackingClass.of("cow/fork-parent-writes/anon-page") == .base)
        #expect(BackingClass.of("vmsplice/unmap-in-child/thp-pmd-swapped") == .swapped)
        #expect(BackingClass.of("iouring-fixed/fork-parent-writes/mthp-64k-partial-shared") == .mthp)
        #expect(BackingClass.of("iouring-fixed/fork-parent-writes/thp-single-pte") == .thpPTE)
        #expect(BackingClass.of("vfio-ro/unpopulated-write/thp-zeropage") == .zeropage)
        #expect(BackingClass.of("iouring-fixed/pagecache-write/memfd-hugetlb-2048k-private") == .pagecache)
        #expect(BackingClass.of("cow/fork-parent-writes/hugetlb-2048k") == .hugetlb)
        let m = Matrix(expected: try Self.history, runs: [
            ("old", Self.doc("6.1.0", [("odirect-thread/read-fork-parent-writes/anon-page", .decoherent),
                                       ("odirect-thread/read-fork-parent-writes/thp-pmd", .coherent),
                                       ("cow/fork-parent-writes/anon-page", .coherent),
                                       ("cow/fork-parent-writes/hugetlb-2048k", .skip)])),
        ])
        let lines = m.summary.split(separator: "\n").map(String.init)
        #expect(lines[0] == "old (6.1.0), against upstream history")
        let odirect = try #require(lines.first { $0.hasPrefix("odirect-thread") })
        // anon-page: as history expects (decoherent before 6.9); thp-pmd: coherent, history says broken.
        #expect(odirect.split(separator: " ", omittingEmptySubsequences: true).dropFirst().map(String.init) == ["1(1d)", "0", "1F"], "\(odirect)")
        let cow = try #require(lines.first { $0.hasPrefix("cow") })
        #expect(cow.split(separator: " ", omittingEmptySubsequences: true).dropFirst().map(String.init) == ["1", "-"], "\(cow)")
    }
}
