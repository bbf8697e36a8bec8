import CCowPin
import Glibc
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// Runs the cases in worker processes (the same binary, posix_spawn()ed), so
/// that a kernel bug that kills the process running a case (SIGBUS on a lost
/// page, SIGSEGV, the OOM killer's SIGKILL) costs that one case, not the run.
///
/// A worker reads the numbers of the case runs it is to run on its stdin, one
/// at a time, and reports its probe and each result as JSON lines on its fd 3.
/// When it dies in the middle of a case, that case is an `error` naming the
/// signal or exit status, what the worker left (its journal, FUSE mounts) is
/// restored, and a new worker takes over. Workers that die `maxDeathsInARow`
/// times without finishing a case end the run: the rest is reported as `error`.
///
/// With `jobs` > 1, up to that many workers run cases side by side, in
/// phases: the cases that run under the same knob values (`SharedNeeds`)
/// form a phase; the supervisor sets those knobs (journaled, under the
/// cross-process lock) for the phase, and its cases may change nothing
/// (`SystemState.besideOthers`). Cases that change what others see (the
/// hugetlb pool, ksmd) run alone, one at a time, and set it themselves.
/// Results are reported in the selection's order whatever the order they
/// finish in. With one job, the cases run one at a time in the selection's
/// order and set their own knobs.
public final class Supervisor {
    public let cases: [Case]
    public let options: RunOptions
    /// How many workers run cases side by side.
    public let jobs: Int
    /// A worker's argv; the first element is the executable.
    let command: [String]
    public static let maxDeathsInARow = 3
    /// How many case runs a worker is sent ahead of the one it runs.
    static let ahead = 3
    /// How long an interrupted worker gets to clean up before SIGKILL.
    public static let graceMs: UInt64 = 10_000

    private struct Shared {
        var interrupted = false
        var workers: Set<pid_t> = []
        /// A worker ran its own interrupt cleanup and reported it.
        var workerReported = false
    }
    private let shared = Locked(Shared())

    public init(cases: [Case], options: RunOptions, jobs: Int = 1, command: [String]) {
        self.cases = cases
        self.options = options
        self.jobs = max(1, jobs)
        self.command = command
    }

    /// The case run with this 1-based number (the sequence is the selection, `repeatCount` times).
    func caseRun(_ number: Int) -> (c: Case, iteration: Int) { cases.caseRun(number) }

    var planned: Int { cases.count * max(1, options.repeatCount) }

    /// Case runs that run in one go, under the same conditions.
    public struct Phase: Equatable {
        /// nil: each case sets what it needs itself, one case at a time.
        /// Otherwise what the supervisor sets up for the phase (its cases'
        /// `SharedNeeds` but swap, set up for the run); its cases run side by side.
        public var needs: SharedNeeds?
        public var numbers: [Int]

        public init(needs: SharedNeeds?, numbers: [Int]) {
            self.needs = needs
            self.numbers = numbers
        }
    }

    /// The phases of the run: with one job, every case run in order, each
    /// setting what it needs itself. Otherwise the case runs grouped by what
    /// they need, and those that run alone, each group in the order of its
    /// first case.
    public func phases() -> [Phase] {
        let all = Array(1..<(planned + 1))
        guard jobs > 1 else { return [Phase(needs: nil, numbers: all)] }
        var list: [Phase] = []
        var index: [SharedNeeds?: Int] = [:]
        for n in all {
            var needs = caseRun(n).c.needs
            needs.swap = false
            let key = needs.alone ? nil : needs
            if let i = index[key] {
                list[i].numbers.append(n)
            } else {
                index[key] = list.count
                list.append(Phase(needs: key, numbers: [n]))
            }
        }
        return list
    }

    /// Sets up what a phase's cases need (journaled, under the cross-process
    /// lock, held until `restore(caseOnly:)`): its knobs, and the huge pages
    /// every case that may run at the same time may hold, twice over (pages
    /// an earlier case's io_uring releases late).
    func setUp(_ needs: SharedNeeds) throws {
        guard needs != .none else { return }
        try SystemState.shared.lockForCase()
        try SystemState.shared.set(needs.knobs)
        for (kb, count) in needs.hugePages.sorted(by: { $0.key < $1.key }) {
            try Backing.growHugetlbPool(kb: kb, free: 2 * jobs * count)
        }
    }

    /// A running worker, as the supervisor sees it.
    final class Slot {
        let pid: pid_t
        /// The write end of the worker's stdin (its commands); -1 once closed.
        var commands: Int32
        /// The read end of its fd 3 (its messages).
        let messages: Int32
        var pending: [UInt8] = []
        /// The case runs sent to it and not finished, in the order it runs them.
        var assigned: [Int] = []
        /// The case run it said it started, when, and the sequence number of
        /// the first kernel log record of the case (when the worker reads the log).
        var running: (number: Int, since: UInt64, kernelSeq: UInt64?)?
        var startedAny = false
        /// Why it gave up, when it said so before exiting (it could not start).
        var fatal: String?

        init(pid: pid_t, commands: Int32, messages: Int32) {
            self.pid = pid
            self.commands = commands
            self.messages = messages
        }
    }

    /// Runs every case run in workers, streaming results to the reporter in
    /// the order of the case runs, exactly as `Runner.run` does.
    @discardableResult
    public func run(reporter: Reporter) -> Totals {
        Emergency.onSignal { [self] sig in interrupted(by: sig) }
        // A worker that dies between a command and its read must not end the run.
        signal(SIGPIPE, SIG_IGN)
        var totals = Totals()
        var began = false
        func begin(_ probe: Probe?) {
            guard !began else { return }
            began = true
            reporter.begin(planned: planned, probe: probe ?? .current())
        }
        var finished: [Int: CaseResult] = [:]
        var nextToReport = 1
        func report(_ r: CaseResult, number: Int) {
            finished[number] = r
            while let r = finished.removeValue(forKey: nextToReport) {
                begin(nil)
                totals.add(r.verdict.kind)
                reporter.finished(r, number: nextToReport)
                nextToReport += 1
            }
        }
        // Several workers share one swap device, set up here for the run.
        if jobs > 1 && cases.contains(where: { $0.needs.swap }) { try? SystemState.shared.ensureSwap() }

        var slots: [Slot] = []
        var deathsInARow = 0
        /// Set when workers died too often: why the remaining case runs are not run.
        var givenUp: String?
        let decoder = JSONDecoder()

        /// The case runs of the phase not sent to a worker yet.
        var queue: ArraySlice<Int> = []

        /// Case runs that ran at the same time as each case run (`--jobs` > 1).
        var overlaps: [Int: Set<Int>] = [:]
        func concurrent(_ log: CaseKernelLog?, number: Int) -> CaseKernelLog? {
            let others = overlaps.removeValue(forKey: number) ?? []
            guard var log, !others.isEmpty else { return log }
            log.concurrent = others.sorted().map { n in
                let (c, iteration) = caseRun(n)
                return options.repeatCount > 1 ? "\(c.id) (run \(iteration))" : c.id
            }
            return log
        }

        func handle(_ m: WorkerMessage, from slot: Slot) {
            if let p = m.probe { begin(p) }
            if let f = m.fatal { slot.fatal = f }
            if let n = m.started {
                slot.running = (n, monotonicNs(), m.kmsg)
                // Kernel messages cannot say which of the cases running at the
                // same time the kernel was in: each of them gets them, and
                // names the others.
                for other in slots where other !== slot {
                    guard let o = other.running?.number else { continue }
                    overlaps[n, default: []].insert(o)
                    overlaps[o, default: []].insert(n)
                }
            }
            if let w = m.result {
                slot.running = nil
                slot.assigned.removeAll { $0 == w.number }
                slot.startedAny = true
                deathsInARow = 0
                var r = w.caseResult
                r.kernel = concurrent(r.kernel, number: w.number)
                report(r, number: w.number)
            }
        }

        /// Reaps a worker whose messages ended: reports its case as an error
        /// when it was in one, restores what it left, and counts the death
        /// unless it exited 0 after its commands ended (`ended`).
        func reap(_ slot: Slot, ended: Bool) {
            slots.removeAll { $0 === slot }
            close(slot.messages)
            if slot.commands >= 0 { close(slot.commands) }
            let outcome = wait(for: slot.pid)
            if ended && outcome.finished && slot.assigned.isEmpty { return }
            let death = outcome.description + (slot.fatal.map { " (\($0))" } ?? ""), hint = outcome.hint
            let restored = Self.recover()
            let during = slot.running.map { " during \(caseRun($0.number).c.id)" }
                ?? (ended ? " after the last case" : slot.startedAny ? " between cases" : " before its first case")
            var note = "cowpin: the worker (pid \(slot.pid)) \(death)\(during)\(hint)"
            note += restored.isEmpty ? "" : "; restored what it left: \(restored.joined(separator: "; "))"
            fputs(note + "\n", stderr)
            if let r = slot.running {
                let (c, iteration) = caseRun(r.number)
                // What the kernel said since the case started (why it killed the
                // worker, an oops in its system call): the worker cannot tell any more.
                let log = r.kernelSeq.map { CaseKernelLog(KernelLogReader.records(from: $0)) }.flatMap { $0.isEmpty ? nil : $0 }
                let verdict = Verdict.error("the cowpin worker \(death) during this case\(hint)").withKernelReports(log?.reports ?? [])
                report(CaseResult(id: c.id, iteration: iteration, verdict: verdict, durationNs: monotonicNs() - r.since,
                                  kernel: concurrent(log, number: r.number)), number: r.number)
                slot.assigned.removeAll { $0 == r.number }
            }
            // What it was sent and had not started goes to the next worker.
            queue = (slot.assigned + queue).sorted()[...]
            if !ended { died("it \(death)\(during)") }
        }

        func died(_ what: String) {
            deathsInARow += 1
            if deathsInARow >= Self.maxDeathsInARow && givenUp == nil {
                givenUp = "not run: the cowpin worker died \(deathsInARow) times in a row without finishing a case (last: \(what))"
            }
        }

        /// Reads what the workers sent, waiting for the next message; reaps the ones that ended.
        func receive(ended: Bool = false) {
            var fds = slots.map { pollfd(fd: $0.messages, events: Int16(POLLIN), revents: 0) }
            guard !fds.isEmpty else { return }
            let r = poll(&fds, nfds_t(fds.count), Self.livenessMs)
            if r < 0 { return }  // EINTR: look again
            if r == 0 {
                // No message for a while. A worker that is dying (SIGKILLed) may
                // not get to close its pipe: a thread of it waits for the answer of
                // its own FUSE server, which died with it. Abort that connection.
                if slots.contains(where: { FuseServer.ownerGone($0.pid) }) { FuseServer.removeStale() }
                return
            }
            var chunk = [UInt8](repeating: 0, count: 1 << 16)
            for (i, slot) in slots.enumerated().reversed() where fds[i].revents != 0 {
                let n = read(slot.messages, &chunk, chunk.count)
                if n < 0 && errno == EINTR { continue }
                if n <= 0 {
                    reap(slot, ended: ended)
                    continue
                }
                slot.pending += chunk[0..<n]
                var start = 0
                while let nl = slot.pending[start...].firstIndex(of: 10) {
                    if let m = WorkerMessage.decode(slot.pending[start..<nl], decoder) { handle(m, from: slot) }
                    start = nl + 1
                }
                slot.pending.removeFirst(start)
            }
        }

        for phase in phases() {
            queue = phase.numbers[...]
            // The supervisor sets the phase's knobs; if it cannot, its cases
            // run one at a time and say why they cannot run themselves.
            var beside = false
            if let needs = phase.needs {
                beside = (try? setUp(needs)) != nil
                if !beside { SystemState.shared.restore(caseOnly: true) }
            }
            let width = beside ? jobs : 1
            while true {
                if let why = givenUp {
                    for n in queue {
                        let (c, iteration) = caseRun(n)
                        report(CaseResult(id: c.id, iteration: iteration, verdict: .error(why)), number: n)
                    }
                    queue = []
                }
                // Each worker is sent a few case runs ahead (its next one waits in
                // its pipe, not for a round trip); at most `width` have any.
                while let n = queue.first {
                    let busy = slots.filter { !$0.assigned.isEmpty }
                    var slot = busy.count < width ? slots.first { $0.assigned.isEmpty } : nil
                    if slot == nil && busy.count < width && slots.count < jobs {
                        guard let new = spawn() else {
                            let why = "could not be started: \(Errno.name(errno))"
                            fputs("cowpin: a worker \(why)\n", stderr)
                            died("it \(why)")
                            break
                        }
                        slots.append(new)
                        slot = new
                    }
                    guard let slot = slot ?? busy.filter({ $0.assigned.count < Self.ahead }).min(by: { $0.assigned.count < $1.assigned.count })
                    else { break }
                    let line = Array("\(n) \(beside ? "beside" : "alone")\n".utf8)
                    let sent = line.withUnsafeBytes { write(slot.commands, $0.baseAddress, $0.count) } == line.count
                    // A worker that cannot take it is dead: its end of file comes next.
                    guard sent else { break }
                    slot.assigned.append(n)
                    queue.removeFirst()
                }
                if queue.isEmpty && !slots.contains(where: { !$0.assigned.isEmpty }) { break }
                if slots.isEmpty { continue }  // a worker could not be started: try again, or give up
                receive()
            }
            if beside { SystemState.shared.restore(caseOnly: true) }
        }
        // The workers clean up and exit when their commands end.
        for slot in slots {
            close(slot.commands)
            slot.commands = -1
        }
        while !slots.isEmpty { receive(ended: true) }
        SystemState.shared.restore()
        begin(nil)
        reporter.end(totals)
        return totals
    }

    /// Starts a worker; nil (errno set) when it cannot be started.
    private func spawn() -> Slot? {
        var msg: [Int32] = [-1, -1], cmd: [Int32] = [-1, -1]
        var r = cp_pipe(&msg)
        if r == 0 {
            r = cp_pipe(&cmd)
            if r != 0 { close(msg[0]); close(msg[1]) }
        }
        guard r == 0 else {
            errno = -r
            return nil
        }
        // The worker's ends, above the fds it is given (dup2 onto itself would keep O_CLOEXEC).
        let msgOut = fcntl(msg[1], F_DUPFD_CLOEXEC, 10)
        let dupErr1 = errno
        let cmdIn = fcntl(cmd[0], F_DUPFD_CLOEXEC, 10)
        let dupErr2 = errno
        close(msg[1]); close(cmd[0])
        guard msgOut >= 0 && cmdIn >= 0 else {
            // Out of file descriptors (RLIMIT_NOFILE): say so, start nothing.
            for fd in [msgOut, cmdIn, msg[0], cmd[1]] where fd >= 0 { close(fd) }
            // EINVAL: RLIMIT_NOFILE is at most 10, so no descriptor from 10 up exists: out of them too.
            let e = msgOut < 0 ? dupErr1 : dupErr2
            errno = e == EINVAL ? EMFILE : e
            return nil
        }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_adddup2(&actions, cmdIn, 0)
        posix_spawn_file_actions_adddup2(&actions, msgOut, 3)
        let cargv = command.map { strdup($0) } + [nil]
        // Under the lock: an interrupt either sees this worker or stops the spawn.
        var pid: pid_t = 0
        let spawned = shared.with { s -> Int32 in
            if s.interrupted { return EINTR }
            let r = posix_spawn(&pid, command[0], &actions, nil, cargv, environ)
            if r == 0 { s.workers.insert(pid) }
            return r
        }
        cargv.forEach { free($0) }
        posix_spawn_file_actions_destroy(&actions)
        close(msgOut); close(cmdIn)
        if spawned == EINTR && shared.with({ $0.interrupted }) { park() }
        guard spawned == 0 else {
            close(msg[0]); close(cmd[1])
            errno = spawned
            return nil
        }
        return Slot(pid: pid, commands: cmd[1], messages: msg[0])
    }

    /// Reaps a worker whose messages ended. A worker killed while a thread
    /// waited for its own FUSE server's answer cannot finish exiting until
    /// that connection is aborted (`FuseServer.removeStale`).
    private func wait(for pid: pid_t) -> Outcome {
        var status: Int32 = 0
        let r = Self.reap(pid, &status)
        let outcome = Outcome(waitStatus: status, pid: pid)
        let interrupted = shared.with { s -> Bool in
            s.workers.remove(pid)
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

    /// How a worker ended.
    struct Outcome: CustomStringConvertible {
        enum How { case finished, exited(Int32), killed(Int32) }
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
            case .finished: return "exited (status 0)"
            case .exited(let code): return "exited with status \(code)"
            case .killed(let sig): return "was killed by \(signalDescription(sig))"
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

    /// waitpid() for a worker that exits (or was killed), aborting the FUSE
    /// connection that keeps a dying worker from exiting, if one does.
    /// How long the supervisor waits for a message before it looks whether a
    /// worker is dying without closing its pipe.
    static let livenessMs: Int32 = 200

    static func reap(_ pid: pid_t, _ status: inout Int32) -> pid_t {
        var waitedMs = 0
        while true {
            let r = waitpid(pid, &status, WNOHANG)
            if r < 0 && errno == EINTR { continue }
            if r != 0 { return r }
            if waitedMs % 100 == 99 { FuseServer.removeStale() }
            usleep(1_000)
            waitedMs += 1
        }
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
        let (pids, reported) = shared.with { s -> (Set<pid_t>, Bool) in
            s.interrupted = true
            return (s.workers, s.workerReported)
        }
        var done: [String] = []
        for pid in pids { kill(pid, sig) }
        let deadline = monotonicNs() + Self.graceMs * 1_000_000
        var left = pids
        var rounds = 0
        while !left.isEmpty && monotonicNs() < deadline {
            for pid in left {
                var status: Int32 = 0
                let r = waitpid(pid, &status, WNOHANG)
                if r == pid || (r < 0 && errno == ECHILD) { left.remove(pid) }
            }
            // A worker stuck on its own dead FUSE server cannot exit until
            // the connection is aborted.
            rounds += 1
            if rounds % 20 == 0 { FuseServer.removeStale() }
            if !left.isEmpty { usleep(5_000) }
        }
        for pid in left {
            var status: Int32 = 0
            kill(pid, SIGKILL)
            _ = Self.reap(pid, &status)
            done.append("killed the cowpin worker \(pid) (no exit \(Self.graceMs / 1000) s after \(signalDescription(sig)))")
        }
        return (done + Self.recover(), !pids.isEmpty || reported)
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
/// starts, or a result (JSON; a result without evidence or notes as tab-separated
/// fields, see `WorkerChannel.resultLine`). Case runs are numbered 1... over the whole run.
public struct WorkerMessage: Codable {
    public var probe: Probe?
    public var started: Int?
    /// With `started`: the sequence number of the case's first kernel log record.
    public var kmsg: UInt64?
    public var result: WorkerResult?
    /// The worker cannot go on (it could not start: EMFILE, EAGAIN...), and why.
    public var fatal: String?

    public init(probe: Probe? = nil, started: Int? = nil, result: WorkerResult? = nil, fatal: String? = nil) {
        self.probe = probe
        self.started = started
        self.result = result
        self.fatal = fatal
    }

    static let startedPrefix = Array("{\"started\":".utf8)

    /// Decodes one line; `{"started":N}` or `{"started":N,"kmsg":S}` (half
    /// the lines) and plain results (most of the others) without JSONDecoder.
    public static func decode(_ line: ArraySlice<UInt8>, _ decoder: JSONDecoder) -> WorkerMessage? {
        if line.starts(with: startedPrefix), line.last == UInt8(ascii: "}") {
            let body = String(decoding: line.dropFirst(startedPrefix.count).dropLast(), as: UTF8.self)
            let parts = body.split(separator: ",")
            if parts.count == 1, let n = Int(parts[0]) { return WorkerMessage(started: n) }
            if parts.count == 2, let n = Int(parts[0]), parts[1].hasPrefix("\"kmsg\":"), let s = UInt64(parts[1].dropFirst(7)) {
                var m = WorkerMessage(started: n)
                m.kmsg = s
                return m
            }
        }
        if let r = WorkerChannel.plainResult(line) { return WorkerMessage(result: r) }
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
    public var policy: PolicyObservation?
    public var kernel: CaseKernelLog?

    init(number: Int, id: String, iteration: Int, verdict: Verdict.Kind, reason: String?, reference: String?, evidence: Evidence?,
         durationNs: UInt64, phases: Phases?, notes: [String]?) {
        self.number = number
        self.id = id
        self.iteration = iteration
        self.verdict = verdict
        self.reason = reason
        self.reference = reference
        self.evidence = evidence
        self.durationNs = durationNs
        self.phases = phases
        self.notes = notes
    }

    public init(_ r: CaseResult, number: Int) {
        self.number = number
        notes = r.notes.isEmpty ? nil : r.notes
        policy = r.policy
        kernel = r.kernel
        id = r.id
        iteration = r.iteration
        verdict = r.verdict.kind
        evidence = r.verdict.evidence
        durationNs = r.durationNs
        phases = r.phases
        switch r.verdict {
        case .skip(let m), .error(let m), .kernelWarning(let m, _): reason = m
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
        case .kernelWarning: v = .kernelWarning(reason: reason ?? "", evidence: evidence)
        }
        return CaseResult(id: id, iteration: iteration, verdict: v, durationNs: durationNs, phases: phases, notes: notes ?? [], policy: policy,
                          kernel: kernel)
    }
}

/// The worker's reporter: writes `WorkerMessage`s to the supervisor's pipe.
public final class WorkerChannel: Reporter {
    /// The fd the supervisor gives the worker for its messages.
    public static let fd: Int32 = 3
    let encoder = JSONEncoder()

    public init() {}

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

    /// Tells the supervisor why this worker cannot go on, before it exits.
    public func fatal(_ why: String) { send(WorkerMessage(fatal: why)) }
    // A case's start and a result without evidence (most of them) are
    // written by hand: JSONEncoder would cost the worker ~50 us a message.
    public func started(_ c: Case, iteration: Int, number: Int) { started(number: number, kernelSeq: nil) }

    /// A case run starts; its kernel log records start at `kernelSeq` (when
    /// the worker reads the log): the supervisor reads them when the worker dies in it.
    public func started(number: Int, kernelSeq: UInt64?) {
        send(Array((kernelSeq.map { "{\"started\":\(number),\"kmsg\":\($0)}" } ?? "{\"started\":\(number)}").utf8))
    }

    public func finished(_ r: CaseResult, number: Int) {
        send(Array(Self.resultLine(r, number: number, encoder: encoder).utf8))
    }

    /// The message line of a result.
    public static func resultLine(_ r: CaseResult, number: Int, encoder: JSONEncoder = JSONEncoder()) -> String {
        let w = WorkerResult(r, number: number)
        guard w.evidence == nil && w.notes == nil && w.policy == nil && w.kernel == nil else {
            return (try? encoder.encode(WorkerMessage(result: w))).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        }
        let phases = w.phases.map { "\($0.memoryNs),\($0.scenarioNs),\($0.cleanupNs)" } ?? ""
        return ["R", String(w.number), String(w.iteration), w.verdict.rawValue, String(w.durationNs), phases,
                escaped(w.id), w.reason.map(escaped) ?? "", w.reference.map(escaped) ?? ""].joined(separator: "\t")
    }

    /// A field of a plain result line: `\`, tab and newline escaped.
    static func escaped(_ s: String) -> String {
        guard s.contains(where: { $0 == "\\" || $0 == "\t" || $0 == "\n" }) else { return s }
        var o = ""
        for c in s {
            switch c {
            case "\\": o += "\\\\"
            case "\t": o += "\\t"
            case "\n": o += "\\n"
            default: o.append(c)
            }
        }
        return o
    }

    static func unescaped(_ s: Substring) -> String {
        guard s.contains("\\") else { return String(s) }
        var o = "", escape = false
        for c in s {
            if escape {
                o.append(c == "t" ? "\t" : c == "n" ? "\n" : c)
                escape = false
            } else if c == "\\" {
                escape = true
            } else {
                o.append(c)
            }
        }
        return o
    }

    /// A plain result line (see `resultLine`); nil when it is not one.
    static func plainResult(_ line: ArraySlice<UInt8>) -> WorkerResult? {
        guard line.starts(with: [UInt8(ascii: "R"), 9]) else { return nil }
        let f = String(decoding: line, as: UTF8.self).split(separator: "\t", omittingEmptySubsequences: false)
        guard f.count == 9, let number = Int(f[1]), let iteration = Int(f[2]), let verdict = Verdict.Kind(rawValue: String(f[3])),
              let duration = UInt64(f[4]) else { return nil }
        var phases: Phases?
        if !f[5].isEmpty {
            let p = f[5].split(separator: ",").compactMap { UInt64($0) }
            guard p.count == 3 else { return nil }
            phases = Phases(memoryNs: p[0], scenarioNs: p[1], cleanupNs: p[2])
        }
        return WorkerResult(number: number, id: unescaped(f[6]), iteration: iteration, verdict: verdict,
                            reason: f[7].isEmpty ? nil : unescaped(f[7]), reference: f[8].isEmpty ? nil : unescaped(f[8]),
                            evidence: nil, durationNs: duration, phases: phases, notes: nil)
    }

    public func end(_ totals: Totals) {}
}

/// A harness self-test knob: `COWPIN_INJECT_FAULT=<case-id>:<sigbus|sigsegv|sigkill|hang|lkdtm=TYPE>`
/// makes the worker crash for real in that case, once its memory is ready.
public struct FaultInjection: Sendable {
    /// `hang` makes a real hung task (see `HungTask`) and goes on with the
    /// case; `lkdtm=TYPE` asks the kernel's crash test module (CONFIG_LKDTM)
    /// for TYPE (WARNING, SOFTLOCKUP, HUNG_TASK, EXCEPTION...) from the case.
    public enum Kind: String, Sendable, CaseIterable { case sigbus, sigsegv, sigkill, hang, lkdtm }
    public static let variable = "COWPIN_INJECT_FAULT"
    public let caseID: String
    public let kind: Kind
    /// The LKDTM crash type, for `lkdtm`.
    public var lkdtmType: String?
    public static let lkdtmPath = "/sys/kernel/debug/provoke-crash/DIRECT"

    /// The injection the environment asks for; throws on a malformed value.
    public static func fromEnvironment() throws -> FaultInjection? {
        guard let raw = getenv(variable).map({ String(cString: $0) }), !raw.isEmpty else { return nil }
        let kinds = Kind.allCases.map { $0 == .lkdtm ? "lkdtm=TYPE" : $0.rawValue }.joined(separator: "|")
        guard let colon = raw.lastIndex(of: ":") else { throw HarnessError("\(variable) must be <case-id>:<\(kinds)>, got '\(raw)'") }
        let value = raw[raw.index(after: colon)...]
        if value.hasPrefix("lkdtm="), value.count > 6, value.dropFirst(6).allSatisfy({ $0.isUppercase || $0.isNumber || $0 == "_" }) {
            var f = FaultInjection(caseID: String(raw[..<colon]), kind: .lkdtm)
            f.lkdtmType = String(value.dropFirst(6))
            return f
        }
        guard let kind = Kind(rawValue: String(value)), kind != .lkdtm else {
            throw HarnessError("\(variable) must be <case-id>:<\(kinds)>, got '\(raw)'")
        }
        return FaultInjection(caseID: String(raw[..<colon]), kind: kind)
    }

    init(caseID: String, kind: Kind) {
        self.caseID = caseID
        self.kind = kind
    }

    /// Injects the fault: crashes the process, makes a hung task and returns
    /// once the kernel reported it (or, where its timeout is long, at once),
    /// or asks LKDTM for a crash (it returns when the kernel does).
    public func inject(timeoutMs: Int32) {
        if kind == .lkdtm, let type = lkdtmType {
            let fd = open(Self.lkdtmPath, O_WRONLY | O_CLOEXEC)
            guard fd >= 0 else {
                fputs("cowpin: \(Self.variable): cannot open \(Self.lkdtmPath) (\(Errno.name(errno))): no LKDTM here (CONFIG_LKDTM, debugfs)\n", stderr)
                _exit(3)
            }
            let n = write(fd, type, type.utf8.count)
            let err = errno
            close(fd)
            fputs("cowpin: \(Self.variable): LKDTM \(type): write \(n < 0 ? "failed (\(Errno.name(err)))" : "returned")\n", stderr)
            return
        }
        guard kind == .hang else { trigger() }
        do {
            let o = try HungTask.make(timeoutMs: timeoutMs)
            fputs("cowpin: \(Self.variable): the hung task (pid \(o.pid), state \(o.state)) was \(o.reported ? "reported by the kernel after \(o.waitedMs) ms" : "not waited for (kernel.hung_task_timeout_secs \(HungTask.timeoutSecs.map(String.init) ?? "?") is too long to wait)")\n", stderr)
        } catch {
            fputs("cowpin: \(Self.variable): the hang did not happen: \(error)\n", stderr)
            _exit(3)
        }
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
        case .hang, .lkdtm:
            break
        }
        fputs("cowpin: \(Self.variable): the \(kind.rawValue) fault did not happen (\(Errno.name(errno)))\n", stderr)
        _exit(3)
    }
}

/// `COWPIN_PROGRESS=FILE`: a line appended to FILE as each case run starts
/// (`start N ID`) and ends (`end N ID VERDICT`), written by the process that
/// runs it (the worker) right before and after, so that it never lags behind.
/// When the kernel dies in the middle of a run (a lockup or hung task that
/// panics a VM), the file says which cases were running: scripts/vm-run reads it.
final class Progress: @unchecked Sendable {
    static let shared = Progress.fromEnvironment()

    let fd: Int32

    init?(path: String) {
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return nil }
    }

    static func fromEnvironment() -> Progress? {
        guard let p = getenv("COWPIN_PROGRESS").map({ String(cString: $0) }), !p.isEmpty else { return nil }
        return Progress(path: p)
    }

    func note(_ line: String) {
        let bytes = Array((line + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    }
}
