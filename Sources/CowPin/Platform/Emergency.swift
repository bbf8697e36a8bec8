import CCowPin
import Glibc

/// Cleanups that must run even when the run is interrupted: live children,
/// FUSE mounts, system state. Run from the signal thread of `cowpin run`.
public enum Emergency {
    static let actions = Locked<[Int: (String, () -> Void)]>([:])
    static let next = Locked(0)
    /// The terminating signal the signal thread took, if any.
    static let taken = Locked<Int32?>(nil)

    /// Call when the run is done, before exiting with its status: a SIGINT,
    /// SIGTERM or SIGHUP that arrived meanwhile (pending, or being handled
    /// by the signal thread) wins, and the run exits 128+signal as promised.
    /// Returns when no such signal came.
    public static func exitIfSignalled() {
        if taken.with({ $0 }) != nil { while true { pause() } }  // the signal thread exits
        var pending = sigset_t()
        sigemptyset(&pending)
        guard sigpending(&pending) == 0 else { return }
        for s in [SIGINT, SIGTERM, SIGHUP] where sigismember(&pending, s) == 1 {
            // The signal thread takes it from here (sigwait), cleans up and exits 128+s.
            while true { pause() }
        }
    }

    /// Registers `body` (described by `what`); returns a token for `remove`.
    public static func add(_ what: String, _ body: @escaping () -> Void) -> Int {
        let id = next.with { n -> Int in
            n += 1
            return n
        }
        actions.with { $0[id] = (what, body) }
        return id
    }

    public static func remove(_ id: Int) { _ = actions.with { $0.removeValue(forKey: id) } }

    /// A supervisor's part, run first on SIGINT/SIGTERM/SIGHUP: it forwards
    /// the signal to its worker and waits for it. `done` is what it cleaned up
    /// itself; `quiet` when the worker printed its own report (then the
    /// supervisor says something only when it had more to clean up).
    static let forwarder = Locked<((Int32) -> (done: [String], quiet: Bool))?>(nil)

    public static func onSignal(_ body: @escaping (Int32) -> (done: [String], quiet: Bool)) {
        forwarder.with { $0 = body }
    }

    /// Runs every registered cleanup (newest first), then restores system state.
    public static func runAll() -> [String] {
        let list = actions.with { a -> [(String, () -> Void)] in
            defer { a.removeAll() }
            return a.sorted { $0.key > $1.key }.map(\.value)
        }
        var done: [String] = []
        for (what, body) in list {
            body()
            done.append(what)
        }
        return done + SystemState.shared.restoreAndClose()
    }

    /// Blocks SIGINT, SIGTERM and SIGHUP in this thread (call before any other
    /// thread starts, so all inherit it) and handles them on a thread of
    /// their own: clean up, report what was restored on stderr, exit 128+signal.
    public static func installSignalHandling() throws {
        var set = sigset_t()
        sigemptyset(&set)
        for s in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
        let blocked = set
        do {
          try startThread {
            var s = blocked
            var sig: Int32 = 0
            while sigwait(&s, &sig) != 0 {}
            taken.with { $0 = sig }
            // The cleanup kills children: a write to one's pipe must not end
            // the process by SIGPIPE before the cleanup is done.
            signal(SIGPIPE, SIG_IGN)
            let forwarded = forwarder.with { $0 }?(sig)
            let done = (forwarded?.done ?? []) + runAll()
            if forwarded?.quiet == true && done.isEmpty { _exit(128 + sig) }
            var msg = "cowpin: interrupted by \(signalName(sig)); cleaned up: "
            msg += done.isEmpty ? "nothing to restore" : done.joined(separator: "; ")
            fputs(msg + "\n", stderr)
            _exit(128 + sig)
          }
        } catch {
            // No signal thread: leave the signals as they were.
            pthread_sigmask(SIG_UNBLOCK, &set, nil)
            throw error
        }
    }
}
