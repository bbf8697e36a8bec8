import CowPin
import Glibc
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

/// Checks `done` every millisecond until it holds; false once `seconds` have
/// passed without. For a state the test waits for (a hold point), bounded:
/// the bound is never what makes the test pass.
func waitUntil(seconds: Int, _ done: () -> Bool) -> Bool {
    let deadline = ContinuousClock.now + .seconds(seconds)
    while !done() {
        if ContinuousClock.now >= deadline { return done() }
        usleep(1_000)
    }
    return true
}

/// Reaps `pid` within `seconds`: its wait status; nil when it did not exit
/// in time (it is then SIGKILLed and reaped).
func reap(_ pid: pid_t, seconds: Int) -> Int32? {
    var status: Int32 = 0
    if waitUntil(seconds: seconds, { waitpid(pid, &status, WNOHANG) == pid }) { return status }
    kill(pid, SIGKILL)
    waitpid(pid, &status, 0)
    return nil
}
