import CowPin
import Testing

/// The default selection on the running kernel: one test case per case
/// (the "slow" gigantic-page cases are sampled by one test below).
/// Coherent passes, skip is reported as skipped with the reason, decoherent
/// fails with the evidence, error fails as a harness error.
@Suite(.serialized)
struct CatalogTests {
    static let runner = Runner()

    @Test("case", arguments: try! Selection().select().map(\.id))
    func catalogCase(_ id: String) throws {
        try check(id)
    }

    @Test("a slow case: an io_uring pin of a 1 GiB hugetlb page", arguments: ["iouring-fixed/exclusive-write/hugetlb-1048576k"])
    func slowCase(_ id: String) throws {
        #expect(try Selection().select().allSatisfy { !$0.tags.contains(Selection.slowTag) })
        try check(id)
    }

    func check(_ id: String) throws {
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
