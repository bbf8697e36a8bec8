import Testing

/// Reports a test that cannot run here as a warning with the reason
/// (swift-testing shows it; the test itself does not fail).
func recordSkip(_ reason: String, sourceLocation: SourceLocation = #_sourceLocation) {
    Issue.record(Comment(rawValue: "SKIP: \(reason)"), severity: .warning, sourceLocation: sourceLocation)
}
