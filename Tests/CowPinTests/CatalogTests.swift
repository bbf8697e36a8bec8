import CowPin
import Testing

/// The default selection on the running kernel: one test case per case
/// (the "slow" gigantic-page cases are sampled by one test below), judged
/// as `cowpin matrix` judges it, against upstream history
/// (data/expected-verdicts.json) for the running kernel's release:
/// - coherent passes; coherent where history expects decoherence (newly
///   fixed) fails, naming the fix history says is missing;
/// - decoherent where history expects it (the base kernel's known state) is a
///   known issue citing the missing fix, with the evidence in the output;
///   decoherent where history says fixed (a regression) fails with the evidence;
/// - skip is reported as skipped with the reason; error fails as a harness error;
/// - a case during which the kernel reported a WARN, BUG, oops, lockup...
///   (its log, `/dev/kmsg`, when readable) fails with the kernel's report;
/// - a pin taken or refused against upstream's policy rule is a warning (a
///   policy fact, stable kernels change it by backport), never a failure of
///   coherence.
@Suite(.serialized)
struct CatalogTests {
    static let runner = Runner()
    static let history = Result { try ExpectedVerdicts.load(ExpectedVerdicts.defaultPath()) }

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
        let history = try Self.history.get()
        let release = Self.runner.probe.kernel.release
        let want = history.expectation(id, release: release)
        let r = Self.runner.run(c)
        if let e = r.verdict.evidence {
            // Decoherent always means data went wrong: every finding names differing bytes.
            #expect(!e.findings.isEmpty && e.findings.allSatisfy { $0.differingBytes > 0 && !$0.ranges.isEmpty }, "\(id): \(e.findings)")
        }
        switch (r.verdict, want) {
        case (.coherent, .verdict(let k, let because)?) where k == .decoherent || k == .xfail:
            Issue.record("NEWLY FIXED \(id): coherent on \(release), where history expects \(k.rawValue) (\(because))")
        case (.coherent, _):
            break
        case (.decoherent(let e), .verdict(.decoherent, let because)?):
            withKnownIssue("expected on \(release): \(because)") { Issue.record(Comment(rawValue: Self.decoherent(id, e))) }
        case (.decoherent(let e), .unknown(let why)?):
            withKnownIssue("history cannot decide on \(release): \(why)") { Issue.record(Comment(rawValue: Self.decoherent(id, e))) }
        case (.decoherent(let e), _):
            let because: String
            switch want {
            case .verdict(_, let b)?: because = b
            case .unknown(let w)?: because = w
            case nil: because = "no history for this case"
            }
            Issue.record(Comment(rawValue: "REGRESSION: " + Self.decoherent(id, e) + "\nhistory expects coherent on \(release): \(because)"))
        case (.xfail(let reason, let ref, _), _):
            withKnownIssue("\(reason) [\(ref)]") { Issue.record("XFAIL \(id)") }
        case (.xpass(let reason, let ref), _):
            Issue.record("XPASS \(id): documented as unfixed upstream (\(reason) [\(ref)]) but coherent here")
        case (.skip(let reason), _):
            // Shown in the output with the reason; the test case itself does not fail.
            Issue.record(Comment(rawValue: "SKIP \(id): \(reason)"), severity: .warning)
        case (.error(let message), _):
            Issue.record("harness error in \(id): \(message)")
        case (.kernelWarning(let message, _), _):
            Issue.record(Comment(rawValue: "KERNEL WARNING in \(id): \(message)\n" + (r.kernel?.text ?? []).joined(separator: "\n")))
        }
        if let p = r.policy, let (rule, because) = history.expectedPolicy(id, release: release), rule != p.allowance {
            Issue.record(Comment(rawValue: "POLICY \(id): \(p) on \(release), upstream's rule says \(rule) (\(because))"), severity: .warning)
        }
    }

    static func decoherent(_ id: String, _ e: Evidence) -> String {
        "DECOHERENT \(id)\n" + EvidenceText.lines(e).joined(separator: "\n")
    }
}
