import CCowPin
import Glibc

/// A hung task made on purpose (`COWPIN_INJECT_FAULT=CASE:hang`), to see how
/// the kernel's hung task detector and the harness report one.
///
/// A reader process (`dd iflag=direct`) reads cowpin's FUSE file; the server
/// reads the READ request and holds it. The reader is then SIGKILLed: a FUSE
/// request the server has already read cannot be interrupted, so the reader
/// sleeps in TASK_UNINTERRUPTIBLE (state D, in `request_wait_answer`) until
/// the answer comes. The hung task detector counts that sleep (it skips
/// TASK_KILLABLE ones: a reader that was not killed is not flagged). After
/// `kernel.hung_task_timeout_secs` (at most twice that: the detector checks
/// once per period) the kernel reports it; with `hung_task_panic=1` the
/// kernel panics.
public enum HungTask {
    /// What happened, for the log.
    public struct Outcome: Sendable {
        public var pid: pid_t
        public var state: Character
        public var wchan: String
        public var reported: Bool
        public var waitedMs: UInt64
    }

    /// The process state letter and wchan of `pid` ("D", "request_wait_answer").
    static func state(_ pid: pid_t) -> (Character?, String) {
        let stat = readText("/proc/\(pid)/stat") ?? ""
        // "pid (comm) S ...": the state follows the last ')'.
        let state = stat.lastIndex(of: ")").flatMap { i in stat[stat.index(after: i)...].first { $0 != " " } }
        return (state, (readText("/proc/\(pid)/wchan") ?? "?").trimmingTrailingNewline)
    }

    static func readText(_ path: String) -> String? {
        guard let bytes = try? readBytes(path, limit: 1 << 16) else { return nil }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// The detector's timeout here (0: disabled).
    public static var timeoutSecs: Int? {
        readText("/proc/sys/kernel/hung_task_timeout_secs").flatMap { Int($0.trimmingTrailingNewline) }
    }

    /// Makes the hung task, waits for the kernel's report when the timeout is
    /// at most `maxWaitSecs` (twice the timeout and 10 s more), then answers
    /// the request: the reader exits. Throws when the reader does not sleep
    /// in state D.
    public static func make(timeoutMs: Int32, maxWaitSecs: Int = 60) throws -> Outcome {
        let server = try FuseServer.forCase(seed: 0x6861_6e67, timeoutMs: timeoutMs)
        defer { FuseServer.endCase(server) }
        let dd = ["/bin/dd", "if=\(server.filePath)", "of=/dev/null", "bs=4096", "count=1", "iflag=direct", "status=none"]
        guard access(dd[0], X_OK) == 0 else { throw CaseSkip("\(dd[0]) is missing: the hung task needs a reader process") }
        server.holdNextRead()
        let argv = dd.map { strdup($0) } + [nil]
        defer { argv.forEach { free($0) } }
        var pid: pid_t = 0
        let r = posix_spawn(&pid, dd[0], nil, nil, argv, environ)
        guard r == 0 else { throw SyscallError("posix_spawn(\(dd[0]))", errno: r) }
        var status: Int32 = 0
        defer {
            // The answer lets the killed reader finish exiting.
            try? server.releaseRead()
            waitpid(pid, &status, 0)
        }
        try server.awaitHeldRead()
        // The reader's detector clock: from here on the log is watched.
        let watch = KernelLogReader()
        _ = watch?.drain()
        kill(pid, SIGKILL)
        var seen: (Character?, String) = (nil, "")
        _ = poll(boundMs: Int(timeoutMs), everyUs: 10_000) {
            seen = state(pid)
            return seen.0 == "D"
        }
        guard let st = seen.0, st == "D" else {
            throw HarnessError("the SIGKILLed reader (pid \(pid)) is in state \(seen.0.map(String.init) ?? "?") (wchan \(seen.1)), not D")
        }
        let note = "cowpin: made a hung task on purpose: dd (pid \(pid)), SIGKILLed while cowpin's FUSE server holds its READ, sleeps in state D (wchan \(seen.1))\n"
        fputs(note, stderr)
        // Also in the kernel's log (as a user line), beside what the kernel will say.
        let k = open("/dev/kmsg", O_WRONLY | O_CLOEXEC)
        if k >= 0 {
            _ = write(k, note, note.utf8.count)
            close(k)
        }
        let start = monotonicNs()
        var reported = false
        if let t = timeoutSecs, t > 0, 2 * t + 10 <= maxWaitSecs, let watch {
            let needle = ":\(pid) blocked for more than"
            reported = poll(boundMs: (2 * t + 10) * 1000, everyUs: 200_000) {
                watch.drain().records.contains { $0.fromKernel && $0.text.contains(needle) }
            }
        }
        return Outcome(pid: pid, state: st, wchan: seen.1, reported: reported, waitedMs: (monotonicNs() - start) / 1_000_000)
    }
}

extension String {
    var trimmingTrailingNewline: String { hasSuffix("\n") ? String(dropLast()) : self }
}
