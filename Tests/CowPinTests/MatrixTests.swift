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

    @Test("every catalog case has a history, and every family matches a case")
    func historyCoversCatalog() throws {
        let h = try Self.history
        for c in Catalog.all { #expect(h.family(of: c.id) != nil, "no history for \(c.id)") }
        for f in h.families { #expect(Catalog.all.contains { Selection.glob(f.cases, $0.id) }, "family \(f.cases) matches no case") }
    }

    @Test func expectationsByVersion() throws {
        let h = try Self.history
        #expect(h.expected("odirect-thread/read-fork-parent-writes/anon-page", release: "6.1.0-56-amd64") == .decoherent)
        #expect(h.expected("odirect-thread/read-fork-parent-writes/anon-page", release: "6.18.44") == .coherent)
        #expect(h.expected("odirect-thread/read-dontfork-parent-writes/anon-page", release: "6.1.0") == .coherent)
        #expect(h.expected("vfio-ro/unpopulated-write/anon-zeropage", release: "6.1.0") == .decoherent)
        #expect(h.expected("vfio-rw/unpopulated-write/anon-zeropage", release: "6.1.0") == .coherent)
        #expect(h.expected("cow/fork-parent-writes/anon-page", release: "4.19") == .coherent)
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
    }
}
