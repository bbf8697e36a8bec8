import CowPin
import Testing

/// Reports a test that cannot run here as a warning with the reason
/// (swift-testing shows it; the test itself does not fail).
func recordSkip(_ reason: String, sourceLocation: SourceLocation = #_sourceLocation) {
    Issue.record(Comment(rawValue: "SKIP: \(reason)"), severity: .warning, sourceLocation: sourceLocation)
}

/// The message of an `error` verdict; for any other verdict, records an
/// issue and returns nil.
func errorMessage(_ v: Verdict, sourceLocation: SourceLocation = #_sourceLocation) -> String? {
    guard case .error(let message) = v else {
        Issue.record("expected error, got \(v)", sourceLocation: sourceLocation)
        return nil
    }
    return message
}
