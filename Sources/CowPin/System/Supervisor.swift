import CCowPin
import Glibc
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Runs the cases in a worker process (the same binary, posix_spawn()ed), so
/// that a kernel bug that kills the process running a case (SIGBUS on a lost
/// page, SIGSEGV, the OOM killer's SIGKILL) costs that one case, not the run.
///
/// The worker reports each case's start and result as JSON lines on its fd 3.
/// When it dies in the middle of a case, that case is an `error` naming the
/// signal or exit status, what the worker left (its journal, FUSE mounts) is
/// restored, and a new worker takes over at the next case. Workers that die
/// `maxDeathsInARow` times without finishing a case end the run: the rest is
/// reported as `error`.
public final class Supervisor {
    public let cases: [Case]
    public let options: RunOptions
    /// The worker's argv for a worker that starts after `from` case runs;
    /// the first element is the executable.
    let command: (Int) -> [String]
    public static let maxDeathsInARow = 3
    /// How long an interrupted worker gets to clean up before SIGKILL.
    public static let graceMs: UInt64 = 10_000

    private struct Shared {
        var interrupted = false
        var worker: pid_t = 0
        /// The worker ran its own interrupt cleanup and reported it.
        var workerReported = false
    }
    private let shared = Locked(Shared())

    public init(cases: [Case], options: RunOptions, command: @escaping (Int) -> [String]) {
        self.cases = cases
        self.options = options
        self.command = command
    }

    /// The case run with this 1-based number (the sequence is the selection, `repeatCount` times).
    func caseRun(_ number: Int) -> (c: Case, iteration: Int) {
        (cases[(number - 1) % cases.count], (number - 1) / cases.count + 1)
    }

    /// Runs every case run in workers, streaming results to the reporter
    /// exactly as `Runner.run` does.
    @discardableResult
    public func run(reporter: Reporter) -> Totals {
        Emergency.onSignal { [self] sig in interrupted(by: sig) }
        let planned = cases.count * max(1, options.repeatCount)
        var totals = Totals()
        var began = false
        func begin(_ probe: Probe?) {
            guard !began else { return }
            began = true
            reporter.begin(planned: planned, probe: probe ?? .current())
        }
        func report(_ r: CaseResult, number: Int) {
            begin(nil)
            totals.add(r.verdict.kind)
            reporter.finished(r, number: number)
        }
        var done = 0
        var deathsInARow = 0
        while done < planned {
            var running: (number: Int, since: UInt64)?
            var startedAny = false
            let outcome = runWorker(from: done) { message in
                if let p = message.probe { begin(p) }
                if let n = message.started {
                    running = (n, monotonicNs())
                    startedAny = true
                }
                if let w = message.result {
                    running = nil
                    deathsInARow = 0
                    done = w.number
                    report(w.caseResult, number: w.number)
                }
            }
            if outcome.finished && done == planned { break }
            let death = outcome.description
            let hint = outcome.hint
            let restored = Self.recover()
            let during = running.map { " during \(caseRun($0.number).c.id)" }
                ?? (done == planned ? " after the last case" : startedAny ? " between cases" : " before its first case")
            var note = "cowpin: the worker\(outcome.pid > 0 ? " (pid \(outcome.pid))" : "") \(death)\(during)\(hint)"
            note += restored.isEmpty ? "" : "; restored what it left: \(restored.joined(separator: "; "))"
            fputs(note + "\n", stderr)
            if let r = running {
                let (c, iteration) = caseRun(r.number)
                report(CaseResult(id: c.id, iteration: iteration, verdict: .error("the cowpin worker \(death) during this case\(hint)"),
                                  durationNs: monotonicNs() - r.since), number: r.number)
                done = r.number
            }
            deathsInARow += 1
            if deathsInARow >= Self.maxDeathsInARow && done < planned {
                let reason = "not run: the cowpin worker died \(deathsInARow) times in a row without finishing a case (last: it \(death)\(during))"
                for number in (done + 1)...planned {
                    let (c, iteration) = caseRun(number)
                    report(CaseResult(id: c.id, iteration: iteration, verdict: .error(reason)), number: number)
                }
                done = planned
            }
        }
        begin(nil)
        reporter.end(totals)
        return totals
    }

    /// How a worker ended.
    struct Outcome: CustomStringConvertible {
        enum How { case finished, exited(Int32), killed(Int32), notStarted(Int32) }
        var how: How
        var pid: pid_t = 0

        init(_ how: How, pid: pid_t = 0) {
            self.how = how
            self.pid = pid
        }

        init(waitStatus s: Int32, pid: pid_t) {
            if s & 0x7f == 0 {
                let code = (s >> 8) & 0xff
                self.init(code == 0 ? .finished : .exited(code), pid: pid)
            } else {
                self.init(.killed(s & 0x7f), pid: pid)
            }
        }

        var finished: Bool {
            if case .finished = how { return true }
            return false
        }

        var description: String {
            switch how {
            case .finished: return "exited (status 0) before its cases were done"
            case .exited(let code): return "exited with status \(code)"
            case .killed(let sig): return "was killed by \(signalDescription(sig))"
            case .notStarted(let err): return "could not be started: \(Errno.name(err))"
            }
        }

        /// For SIGKILL: whether the kernel log shows the OOM killer choosing the worker.
        var hint: String {
            guard case .killed(SIGKILL) = how else { return "" }
            switch Supervisor.oomKill(of: pid) {
            case .some(let line?): return " (the OOM killer: \(line))"
            case .some(nil): return " (not by the OOM killer: the kernel log does not show it killing pid \(pid))"
            case nil: return " (the OOM killer sends SIGKILL: see the kernel log)"
            }
        }
    }

    /// The kernel log's line about the OOM killer killing `pid`: nil when the
    /// log cannot be read, .some(nil) when it has no such line.
    static func oomKill(of pid: pid_t) -> String?? {
        let fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var found: String?
        var record = [UInt8](repeating: 0, count: 8192)
        while true {
            let n = read(fd, &record, record.count)
            if n < 0 && errno == EPIPE { continue }  // a record was overwritten while reading
            if n <= 0 { break }
            // "prio,seq,usec,flags;Out of memory: Killed process PID (cowpin) ..."
            let text = String(decoding: record[0..<n], as: UTF8.self)
            guard let semi = text.firstIndex(of: ";") else { continue }
            let message = text[text.index(after: semi)...].prefix { $0 != "\n" }
            if message.contains("Killed process \(pid) (") { found = String(message) }
        }
        return .some(found)
    }

    /// Spawns a worker for the case runs after `from`, feeds its messages
    /// to `handle` until it exits, and reaps it.
    private func runWorker(from: Int, handle: (WorkerMessage) -> Void) -> Outcome {
        var msg: [Int32] = [-1, -1], life: [Int32] = [-1, -1]
        guard pipe(&msg) == 0 else { return Outcome(.notStarted(errno)) }
        guard pipe(&life) == 0 else {
            let e = errno
            close(msg[0]); close(msg[1])
            return Outcome(.notStarted(e))
        }
        // The supervisor's ends stay out of the worker (nothing else spawns meanwhile).
        _ = fcntl(msg[0], F_SETFD, FD_CLOEXEC)
        _ = fcntl(life[1], F_SETFD, FD_CLOEXEC)
        defer { close(msg[0]); close(life[1]) }
        // The worker's ends, above the fds it is given (dup2 onto itself would keep O_CLOEXEC).
        let msgOut = fcntl(msg[1], F_DUPFD_CLOEXEC, 10), lifeIn = fcntl(life[0], F_DUPFD_CLOEXEC, 10)
        close(msg[1]); close(life[0])
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_adddup2(&actions, lifeIn, 0)
        posix_spawn_file_actions_adddup2(&actions, msgOut, 3)
        let argv = command(from)
        let cargv = argv.map { strdup($0) } + [nil]
        // Under the lock: an interrupt either sees this worker or stops the spawn.
        let spawned = shared.with { s -> Int32 in
            if s.interrupted { return EINTR }
            var pid: pid_t = 0
            let r = posix_spawn(&pid, argv[0], &actions, nil, cargv, environ)
            if r == 0 { s.worker = pid }
            return r
        }
        cargv.forEach { free($0) }
        posix_spawn_file_actions_destroy(&actions)
        close(msgOut); close(lifeIn)
        if spawned == EINTR && shared.with({ $0.interrupted }) { park() }
        guard spawned == 0 else { return Outcome(.notStarted(spawned)) }
        let pid = shared.with { $0.worker }

        let decoder = JSONDecoder()
        var pending = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while true {
            let n = read(msg[0], &chunk, chunk.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            pending += chunk[0..<n]
            var start = 0
            while let nl = pending[start...].firstIndex(of: 10) {
                if let m = WorkerMessage.decode(pending[start..<nl], decoder) { handle(m) }
                start = nl + 1
            }
            pending.removeFirst(start)
        }
        var status: Int32 = 0
        var r: pid_t
        repeat { r = waitpid(pid, &status, 0) } while r < 0 && errno == EINTR
        let outcome = Outcome(waitStatus: status, pid: pid)
        let interrupted = shared.with { s -> Bool in
            s.worker = 0
            // A worker that ran its own SIGINT/SIGTERM/SIGHUP cleanup was interrupted: so is the run.
            if case .exited(let code) = outcome.how, [SIGINT, SIGTERM, SIGHUP].contains(code - 128) {
                s.interrupted = true
                s.workerReported = true
                kill(getpid(), code - 128)
            }
            return s.interrupted
        }
        // The signal thread finishes the run (and exits); r < 0 means it reaped the worker.
        if interrupted || r < 0 { park() }
        return outcome
    }

    /// Blocks for good: the signal thread ends the process.
    private func park() -> Never {
        while true { pause() }
    }

    /// Restores what a dead worker left: its journal (knobs, hugetlb pool,
    /// swap device) and its FUSE mounts.
    static func recover() -> [String] {
        let restored = SystemState.recoverStale()
        FuseServer.removeStale()
        return restored
    }

    /// On SIGINT/SIGTERM/SIGHUP (the signal thread): forwards the signal to
    /// the worker, waits (bounded) for its cleanup, then restores whatever
    /// it could not. The worker reports its own cleanup.
    private func interrupted(by sig: Int32) -> (done: [String], quiet: Bool) {
        let (pid, reported) = shared.with { s -> (pid_t, Bool) in
            s.interrupted = true
            return (s.worker, s.workerReported)
        }
        var done: [String] = []
        if pid > 0 {
            kill(pid, sig)
            let deadline = monotonicNs() + Self.graceMs * 1_000_000
            var status: Int32 = 0
            var gone = false
            while monotonicNs() < deadline {
                let r = waitpid(pid, &status, WNOHANG)
                if r == pid || (r < 0 && errno == ECHILD) {
                    gone = true
                    break
                }
                usleep(5_000)
            }
            if !gone {
                kill(pid, SIGKILL)
                _ = waitpid(pid, &status, 0)
                done.append("killed the cowpin worker \(pid) (no exit \(Self.graceMs / 1000) s after \(signalDescription(sig)))")
            }
        }
        return (done + Self.recover(), pid > 0 || reported)
    }
}

/// How the supervisor names the selection to its worker: index ranges into
/// `Catalog.all` ("0-20,25"), short whatever the selection (800 case ids as
/// arguments cost the worker's argument parsing 60 ms), and a digest of the
/// ids that the worker checks.
public enum WorkerSelection {
    public static func ranges(_ cases: [Case]) -> String {
        var index: [String: Int] = [:]
        for (i, c) in Catalog.all.enumerated() { index[c.id] = i }
        var parts: [String] = []
        var run: (first: Int, last: Int)?
        func flush() {
            guard let r = run else { return }
            parts.append(r.first == r.last ? "\(r.first)" : "\(r.first)-\(r.last)")
        }
        for c in cases {
            let i = index[c.id] ?? -1
            if let r = run, i == r.last + 1 {
                run = (r.first, i)
            } else {
                flush()
                run = (i, i)
            }
        }
        flush()
        return parts.joined(separator: ",")
    }

    /// The cases `ranges` names; nil when it does not parse or names no case.
    public static func cases(_ ranges: String) -> [Case]? {
        let all = Catalog.all
        var out: [Case] = []
        for part in ranges.split(separator: ",", omittingEmptySubsequences: false) {
            let ends = part.split(separator: "-", maxSplits: 1, omittingEmptySubsequences: false).map { Int($0) }
            guard let first = ends.first ?? nil, let last = ends.last ?? nil, 0 <= first, first <= last, last < all.count else { return nil }
            out += all[first...last]
        }
        return out.isEmpty ? nil : out
    }

    /// FNV-1a over the ids, hex.
    public static func digest(_ cases: [Case]) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for c in cases {
            for b in c.id.utf8 + [0] {
                h ^= UInt64(b)
                h = h &* 0x100_0000_01b3
            }
        }
        return String(h, radix: 16)
    }
}

/// "SIGBUS (signal 7)".
public func signalDescription(_ sig: Int32) -> String {
    let names: [Int32: String] = [
        1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT", 7: "SIGBUS",
        8: "SIGFPE", 9: "SIGKILL", 11: "SIGSEGV", 13: "SIGPIPE", 14: "SIGALRM", 15: "SIGTERM", 24: "SIGXCPU", 25: "SIGXFSZ",
    ]
    return "\(names[sig] ?? "signal \(sig)") (signal \(sig))"
}

/// One line from the worker to the supervisor: its probe, a case run that
/// starts, or a result. Case runs are numbered 1... over the whole run.
public struct WorkerMessage: Codable {
    public var probe: Probe?
    public var started: Int?
    public var result: WorkerResult?

    public init(probe: Probe? = nil, started: Int? = nil, result: WorkerResult? = nil) {
        self.probe = probe
        self.started = started
        self.result = result
    }

    static let startedPrefix = Array("{\"started\":".utf8)

    /// Decodes one line; `{"started":N}` (half the lines) without JSONDecoder.
    static func decode(_ line: ArraySlice<UInt8>, _ decoder: JSONDecoder) -> WorkerMessage? {
        if line.starts(with: startedPrefix), line.last == UInt8(ascii: "}"),
           let n = Int(String(decoding: line.dropFirst(startedPrefix.count).dropLast(), as: UTF8.self)) {
            return WorkerMessage(started: n)
        }
        return try? decoder.decode(WorkerMessage.self, from: Data(line))
    }
}

/// A `CaseResult` on the wire.
public struct WorkerResult: Codable, Equatable {
    public var number: Int
    public var id: String
    public var iteration: Int
    public var verdict: Verdict.Kind
    public var reason: String?
    public var reference: String?
    public var evidence: Evidence?
    public var durationNs: UInt64
    public var phases: Phases?
    public var notes: [String]?

    public init(_ r: CaseResult, number: Int) {
        self.number = number
        notes = r.notes.isEmpty ? nil : r.notes
        id = r.id
        iteration = r.iteration
        verdict = r.verdict.kind
        evidence = r.verdict.evidence
        durationNs = r.durationNs
        phases = r.phases
        switch r.verdict {
        case .skip(let m), .error(let m): reason = m
        case .xfail(let m, let ref, _), .xpass(let m, let ref):
            reason = m
            reference = ref
        case .coherent, .decoherent: break
        }
    }

    public var caseResult: CaseResult {
        let v: Verdict
        switch verdict {
        case .coherent: v = .coherent
        case .decoherent: v = .decoherent(evidence ?? Evidence())
        case .skip: v = .skip(reason: reason ?? "")
        case .xfail: v = .xfail(reason: reason ?? "", reference: reference ?? "", evidence: evidence ?? Evidence())
        case .xpass: v = .xpass(reason: reason ?? "", reference: reference ?? "")
        case .error: v = .error(reason ?? "")
        }
        return CaseResult(id: id, iteration: iteration, verdict: v, durationNs: durationNs, phases: phases, notes: notes ?? [])
    }
}

/// The worker's reporter: writes `WorkerMessage`s to the supervisor's pipe.
public final class WorkerChannel: Reporter {
    /// The fd the supervisor gives the worker for its messages.
    public static let fd: Int32 = 3
    let encoder = JSONEncoder()

    public init() {}

    /// When the supervisor is gone (its end of the worker's stdin closes, or
    /// a message finds no reader), the worker cleans up as on SIGTERM and
    /// exits. SIGPIPE is ignored for that (children reset it to the default).
    public static func exitWithSupervisor() {
        signal(SIGPIPE, SIG_IGN)
        startThread {
            var b: UInt8 = 0
            while true {
                let n = read(0, &b, 1)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { break }
            }
            supervisorGone()
        }
    }

    /// SIGTERM to this process (the signal thread cleans up and exits); this thread waits for that.
    static func supervisorGone() -> Never {
        kill(getpid(), SIGTERM)
        while true { pause() }
    }

    func send(_ m: WorkerMessage) {
        guard let bytes = try? encoder.encode(m) else { return }
        send(Array(bytes))
    }

    /// One message line (the bytes of one JSON object).
    func send(_ line: [UInt8]) {
        var bytes = line
        bytes.append(10)
        bytes.withUnsafeBytes { raw in
            var off = 0
            while off < raw.count {
                let n = write(Self.fd, raw.baseAddress! + off, raw.count - off)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 { Self.supervisorGone() }
                off += n
            }
        }
    }

    public func begin(planned: Int, probe: Probe) { send(WorkerMessage(probe: probe)) }
    // A case's start and a result without evidence (most of them) are
    // written by hand: JSONEncoder would cost the worker ~50 us a message.
    public func started(_ c: Case, iteration: Int, number: Int) { send(Array("{\"started\":\(number)}".utf8)) }

    public func finished(_ r: CaseResult, number: Int) {
        send(Array(Self.resultLine(r, number: number, encoder: encoder).utf8))
    }

    /// The message line of a result.
    public static func resultLine(_ r: CaseResult, number: Int, encoder: JSONEncoder = JSONEncoder()) -> String {
        let w = WorkerResult(r, number: number)
        guard w.evidence == nil && w.notes == nil else {
            return (try? encoder.encode(WorkerMessage(result: w))).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        }
        var o = "{\"result\":{\"number\":\(w.number),\"id\":\(Self.quoted(w.id)),\"iteration\":\(w.iteration),"
        o += "\"verdict\":\"\(w.verdict.rawValue)\",\"durationNs\":\(w.durationNs)"
        if let reason = w.reason { o += ",\"reason\":\(Self.quoted(reason))" }
        if let reference = w.reference { o += ",\"reference\":\(Self.quoted(reference))" }
        if let p = w.phases { o += ",\"phases\":{\"memoryNs\":\(p.memoryNs),\"scenarioNs\":\(p.scenarioNs),\"cleanupNs\":\(p.cleanupNs)}" }
        return o + "}}"
    }

    /// A JSON string literal.
    static func quoted(_ s: String) -> String {
        var o = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": o += "\\\""
            case "\\": o += "\\\\"
            case "\n": o += "\\n"
            case _ where u.value < 0x20:
                let hex = String(u.value, radix: 16)
                o += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: o.unicodeScalars.append(u)
            }
        }
        return o + "\""
    }

    public func end(_ totals: Totals) {}
}

/// A harness self-test knob: `COWPIN_INJECT_FAULT=<case-id>:<sigbus|sigsegv|sigkill>`
/// makes the worker crash for real in that case, once its memory is ready.
public struct FaultInjection: Sendable {
    public enum Kind: String, Sendable, CaseIterable { case sigbus, sigsegv, sigkill }
    public static let variable = "COWPIN_INJECT_FAULT"
    public let caseID: String
    public let kind: Kind

    /// The injection the environment asks for; throws on a malformed value.
    public static func fromEnvironment() throws -> FaultInjection? {
        guard let raw = getenv(variable).map({ String(cString: $0) }), !raw.isEmpty else { return nil }
        guard let colon = raw.lastIndex(of: ":"), let kind = Kind(rawValue: String(raw[raw.index(after: colon)...])) else {
            throw HarnessError("\(variable) must be <case-id>:<\(Kind.allCases.map(\.rawValue).joined(separator: "|"))>, got '\(raw)'")
        }
        return FaultInjection(caseID: String(raw[..<colon]), kind: kind)
    }

    /// Crashes the process the way the kernel would.
    public func trigger() -> Never {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        switch kind {
        case .sigbus:
            // A shared mapping of a page the file no longer has: the read faults SIGBUS.
            let fd = cp_memfd_create("cowpin-fault", 0)
            if fd >= 0, ftruncate(fd, off_t(page)) == 0, let p = mmap(nil, page, PROT_READ, MAP_SHARED, fd, 0), p != MAP_FAILED,
               ftruncate(fd, 0) == 0 {
                var b = p.load(as: UInt8.self)
                _ = write(2, &b, 0)
            }
        case .sigsegv:
            if let p = mmap(nil, page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED {
                var b = p.load(as: UInt8.self)
                _ = write(2, &b, 0)
            }
        case .sigkill:
            kill(getpid(), SIGKILL)
        }
        fputs("cowpin: \(Self.variable): the \(kind.rawValue) fault did not happen (\(Errno.name(errno)))\n", stderr)
        _exit(3)
    }
}
