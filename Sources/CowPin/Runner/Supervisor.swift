import CCowPin
import Glibc
import SystemPackage
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
/// at a time, and reports its probe and each result as lines on its fd 3
/// (`WorkerChannel`, written as `WireCodec` says). `Scheduler` hands out the
/// case runs and reads the results.
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

    /// Runs every case run in workers, streaming results to the reporter in
    /// the order of the case runs, exactly as `Runner.run` does.
    @discardableResult
    public func run(reporter: Reporter) -> Totals {
        Emergency.onSignal { [self] sig in interrupted(by: sig) }
        // A worker that dies between a command and its read must not end the run.
        signal(SIGPIPE, SIG_IGN)
        // Several workers share one swap device, set up here for the run.
        if jobs > 1 && cases.contains(where: { $0.needs.swap }) { try? SystemState.shared.ensureSwap() }
        return Scheduler(self, reporter: reporter).run()
    }

    /// Starts a worker; throws why it cannot be started.
    func spawn() throws(Errno) -> Scheduler.Slot {
        let msg = try FileDescriptor.pipe(options: .closeOnExec)
        let cmd: (readEnd: FileDescriptor, writeEnd: FileDescriptor)
        do {
            cmd = try FileDescriptor.pipe(options: .closeOnExec)
        } catch {
            closeBoth(msg)
            throw error
        }
        // The worker's ends, above the fds it is given (dup2 onto itself would keep O_CLOEXEC).
        // Out of file descriptors (RLIMIT_NOFILE): say so, start nothing.
        let msgOut: FileDescriptor, cmdIn: FileDescriptor
        do {
            msgOut = try Self.duplicateAbove9(msg.writeEnd)
        } catch {
            closeBoth(msg)
            closeBoth(cmd)
            throw error
        }
        do {
            cmdIn = try Self.duplicateAbove9(cmd.readEnd)
        } catch {
            try? msgOut.close()
            closeBoth(msg)
            closeBoth(cmd)
            throw error
        }
        try? msg.writeEnd.close()
        try? cmd.readEnd.close()
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_adddup2(&actions, cmdIn.rawValue, 0)
        posix_spawn_file_actions_adddup2(&actions, msgOut.rawValue, WorkerChannel.fd)
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
        try? msgOut.close()
        try? cmdIn.close()
        if spawned == EINTR && shared.with({ $0.interrupted }) { park() }
        guard spawned == 0 else {
            try? msg.readEnd.close()
            try? cmd.writeEnd.close()
            throw Errno(rawValue: spawned)
        }
        return Scheduler.Slot(pid: pid, commands: cmd.writeEnd, messages: msg.readEnd)
    }

    private func closeBoth(_ pipe: (readEnd: FileDescriptor, writeEnd: FileDescriptor)) {
        try? pipe.readEnd.close()
        try? pipe.writeEnd.close()
    }

    /// A close-on-exec duplicate numbered 10 or more (F_DUPFD_CLOEXEC).
    static func duplicateAbove9(_ fd: FileDescriptor) throws(Errno) -> FileDescriptor {
        let r = fcntl(fd.rawValue, F_DUPFD_CLOEXEC, 10)
        // EINVAL: RLIMIT_NOFILE is at most 10, so no descriptor from 10 up exists: out of them too.
        guard r >= 0 else { throw errno == EINVAL ? .tooManyOpenFiles : Errno(rawValue: errno) }
        return FileDescriptor(rawValue: r)
    }

    /// Reaps a worker whose messages ended. A worker killed while a thread
    /// waited for its own FUSE server's answer cannot finish exiting until
    /// that connection is aborted (`FuseServer.removeStale`).
    func wait(for pid: pid_t) -> Outcome {
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

    /// How long the supervisor waits for a message before it looks whether a
    /// worker is dying without closing its pipe.
    static let livenessMs: Int32 = 200

    /// waitpid() for a worker that exits (or was killed), aborting the FUSE
    /// connection that keeps a dying worker from exiting, if one does.
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
    func park() -> Never {
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
