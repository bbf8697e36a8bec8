import CowPin
import Testing

/// The catalog on the running kernel: one test case per catalog case.
/// Coherent passes, skip is reported as skipped with the reason, decoherent
/// fails with the evidence, error fails as a harness error.
@Suite(.serialized)
struct CatalogTests {
    static let runner = Runner()

    @Test("case", arguments: Catalog.all.map(\.id))
    func catalogCase(_ id: String) throws {
        let c = try #require(Catalog.find(id))
        let r = Self.runner.run(c)
        switch r.verdict {
        case .coherent:
            break
        case .decoherent(let e):
            Issue.record(Comment(rawValue: "DECOHERENT \(id)\n" + EvidenceText.lines(e).joined(separator: "\n")))
        case .xfail(let reason, let ref, _):
            withKnownIssue("\(reason) [\(ref)]") { Issue.record("XFAIL \(id)") }
        case .xpass(let reason, let ref):
            Issue.record("XPASS \(id): documented as unfixed upstream (\(reason) [\(ref)]) but coherent here")
        case .skip(let reason):
            // Shown in the output with the reason; the test case itself does not fail.
            Issue.record(Comment(rawValue: "SKIP \(id): \(reason)"), severity: .warning)
        case .error(let message):
            Issue.record("harness error in \(id): \(message)")
        }
    }
}
